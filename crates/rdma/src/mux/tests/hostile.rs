//! A hostile VM or peer against the multiplexer (issue 11): GIDs the host did not give the VM,
//! tables grown by varying IDs, alternate paths and rdma_cm addresses naming another VM.
use super::*;

#[test]
fn a_vm_registers_only_the_gids_the_host_allows_it() {
    let f = fixture(1);
    let (own, configured_elsewhere) = (g(10, 0, 5, 1), g(10, 0, 5, 2));
    f.mux.attach_vm(7, RecSink::new()).unwrap();
    f.mux.set_allowed_gids(7, &[own]).unwrap();
    // A GID nobody has bound yet, but not this VM's: refused and counted.
    let e = f.mux.register_gid(7, configured_elsewhere).unwrap_err();
    assert!(matches!(e, RdmaError::GidNotAllowed { vm: 7, .. }), "{e}");
    assert_eq!(f.mux.owner_of(configured_elsewhere), None);
    // The IPv4-mapped and zero-padded forms are one GID: the allowed one is accepted either way.
    let mut padded = own;
    padded.0[10] = 0;
    padded.0[11] = 0;
    f.mux.register_gid(7, padded).unwrap();
    assert_eq!(f.mux.owner_of(own), Some(7));
    let s = f.mux.stats();
    assert_eq!(
        (s.registrations_refused, s.registrations_not_allowed),
        (1, 1)
    );
    // The other VM, configured with it, gets it.
    f.mux.attach_vm(8, RecSink::new()).unwrap();
    f.mux.set_allowed_gids(8, &[configured_elsewhere]).unwrap();
    f.mux.register_gid(8, configured_elsewhere).unwrap();
}
