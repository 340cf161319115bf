//! Spoofed REQs against an endpoint (`ferry rdma host/peer`): a bounded connection table and
//! timers a peer cannot stretch to hours (issue 11).
use super::*;
use rdma_wire::cm::Req;

fn spoofed_req(i: u32) -> (Gid, Mad) {
    let mut from = A;
    from.0[14] = (i >> 8) as u8;
    from.0[15] = i as u8;
    let mut r = Req {
        hdr: MadHeader::cm(attr::REQ, 0x7700 + u64::from(i)),
        local_comm_id: 0x5000 + i,
        service_id: SVC,
        local_qpn: 0x99,
        // 2^31 × 4.096 µs ≈ 2.4 hours per retry, 15 retries.
        local_cm_response_timeout: 31,
        remote_cm_response_timeout: 31,
        max_cm_retries: 15,
        ..Req::default()
    };
    r.primary_path.local_gid = from;
    r.primary_path.remote_gid = B;
    (from, r.to_mad())
}

#[test]
fn spoofed_reqs_fill_a_bounded_table_and_their_timers_are_clamped() {
    let cfg = CmConfig {
        max_connections: 16,
        ..CmConfig::fast()
    };
    let p = pair(cfg);
    p.wb.muted.store(true, Ordering::SeqCst); // the spoofed sources never answer
    for i in 0..100 {
        let (from, mad) = spoofed_req(i);
        p.b.on_mad(from, B, &mad);
    }
    assert_eq!(p.b.connection_count(), 16, "bounded");
    let s = p.b.stats();
    assert_eq!(s.table_full, 84, "counted");
    assert_eq!(s.timeouts_clamped, 16);
    // Every REP retry waits at most the clamped timeout: the spoofed connections time out
    // within 16 of them (the first REP and 15 retries), not within 16 × 2.4 hours.
    let (step, _) = timers::peer_timeout(31);
    p.advance_until(step, 17, || p.b.connection_count() == 0);
    assert_eq!(p.b.stats().timeouts, 16);
    // The table has room again for a real peer.
    p.wb.muted.store(false, Ordering::SeqCst);
    p.a.connect(B, params(), WAIT)
        .expect("a real peer connects");
}
