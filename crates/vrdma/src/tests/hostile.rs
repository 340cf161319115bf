//! A hostile guest against GID bindings (issue 11).
use super::*;

#[test]
fn a_ud_queue_pair_stops_sending_and_receiving_as_a_gid_once_it_is_unbound() {
    let mut g = Guest::new(FakeBackend::default());
    let (lkey, cq_pages, qpn, qp_pages) = g.ud_qp_in_rts();
    // Unbind the QP's GID (another VM may own it next), bind another one at the same index.
    let (e, _) = g.cmd(&abi::CmdDestroyBind {
        hdr: Guest::hdr(cmd_code::DESTROY_BIND),
        index: 0,
        dest_gid: gid(1).0,
        ..Default::default()
    });
    assert_eq!(e, 0);
    assert_eq!(g.bind(0, gid(3)), 0);
    let buf = g.page();
    g.mem.write(buf, b"still me").unwrap();
    let sge = abi::Sge {
        addr: buf,
        length: 8,
        lkey,
    };
    g.post_send(&qp_pages, 0, gid(2), 0x99, sge);
    g.backend.ud_inbound.lock().unwrap().push(UdDatagram {
        sgid: gid(2),
        src_qpn: 0x99,
        grh: [1; 40],
        imm: None,
        data: b"to the old GID".to_vec(),
    });
    let rbuf = g.page();
    g.post_recv(&qp_pages, 0, rbuf, 100, lkey);
    g.dev.poll();
    assert!(
        g.backend.ud_sent.lock().unwrap().is_empty(),
        "nothing sent as the unbound GID"
    );
    let st = g.dev.stats();
    assert_eq!((st.ud_sent, st.ud_received), (0, 0));
    assert_eq!(st.ud_qps_unbound, 1, "counted");
    assert!(st.async_events >= 1, "the guest is told (QP_FATAL)");
    // Back from the error state: still no host queue pair behind it; sends complete in error.
    for s in [
        qp_state::RESET,
        qp_state::INIT,
        qp_state::RTR,
        qp_state::RTS,
    ] {
        assert_eq!(g.modify(qpn, s), 0);
    }
    g.post_send(&qp_pages, 0, gid(2), 0x99, sge);
    g.post_recv(&qp_pages, 0, rbuf, 100, lkey);
    g.dev.poll();
    assert!(g.backend.ud_sent.lock().unwrap().is_empty());
    let cqes = g.cqes(&cq_pages);
    assert_eq!(cqes.len(), 1, "{cqes:?}");
    assert_ne!(cqes[0].status, 0, "an error completion");
    assert_eq!(g.dev.stats().ud_received, 0);
}
