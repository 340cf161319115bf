//! Tests of the fault proxy with a fake source and destination over loopback.
use super::*;
use crate::wire::MemoryBatch;

const T: Duration = Duration::from_secs(30);

/// A fake source: Hello, Config, three Memory frames of round 0, RoundEnd 0, one of round
/// 1, RoundEnd 1, VmState, DeviceState, Complete; then Ready → Go → Resumed.
fn fake_source(addr: SocketAddr) -> Result<Vec<Kind>> {
    let mut s = TcpStream::connect(addr).map_err(MigrationError::io("connect"))?;
    s.set_read_timeout(Some(T)).unwrap();
    let mut got = Vec::new();
    let mut buf = Vec::new();
    wire::send(&mut s, Kind::Hello, &wire::hello())?;
    got.push(wire::recv(&mut s, &mut buf)?);
    wire::send(&mut s, Kind::Config, b"cfg")?;
    for round in 0..2u32 {
        for i in 0..if round == 0 { 3 } else { 1 } {
            let mut b = MemoryBatch::new(round);
            b.push_page(0x1000 * (i + 1), &[round as u8 + 1; 4096]);
            wire::send(&mut s, Kind::Memory, b.finish())?;
        }
        wire::send(
            &mut s,
            Kind::RoundEnd,
            &[round.to_le_bytes(), [0; 4]].concat(),
        )?;
    }
    wire::send(&mut s, Kind::VmState, b"vm")?;
    wire::send(&mut s, Kind::DeviceState, b"\x01\x00d")?;
    wire::send(&mut s, Kind::Complete, &[])?;
    got.push(wire::recv(&mut s, &mut buf)?);
    wire::send(&mut s, Kind::Go, &[])?;
    got.push(wire::recv(&mut s, &mut buf)?);
    Ok(got)
}

/// A fake destination: answers Hello, reads until Complete, says Ready, waits for Go, says
/// Resumed. Returns the kinds it received, or the error that ended it with them.
fn fake_destination(listener: TcpListener) -> DestEnd {
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut got = Vec::new();
    let mut buf = Vec::new();
    let mut step = || -> Result<()> {
        loop {
            let k = wire::recv(&mut s, &mut buf)?;
            got.push(k);
            match k {
                Kind::Hello => wire::send(&mut s, Kind::Hello, &wire::hello())?,
                Kind::Complete => wire::send(&mut s, Kind::Ready, &[])?,
                Kind::Go => {
                    wire::send(&mut s, Kind::Resumed, &[])?;
                    return Ok(());
                }
                _ => {}
            }
        }
    };
    let r = step().err();
    (got, r)
}

/// What the fake destination received and what ended it.
type DestEnd = (Vec<Kind>, Option<MigrationError>);

/// A fake destination, the proxy in front of it and a fake source through it, running.
fn spawn(
    fault: Option<Fault>,
) -> (
    FaultProxy,
    JoinHandle<Result<Vec<Kind>>>,
    JoinHandle<DestEnd>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = listener.local_addr().unwrap();
    let dest = std::thread::spawn(move || fake_destination(listener));
    let proxy = FaultProxy::start(target, fault).unwrap();
    let addr = proxy.addr();
    let src = std::thread::spawn(move || fake_source(addr));
    (proxy, src, dest)
}

fn run(fault: Option<Fault>) -> (FaultProxy, Result<Vec<Kind>>, DestEnd) {
    let (proxy, src, dest) = spawn(fault);
    let src = src.join().unwrap();
    (proxy, src, dest.join().unwrap())
}

fn memory_frames(kinds: &[Kind]) -> usize {
    kinds.iter().filter(|k| **k == Kind::Memory).count()
}

#[test]
fn without_a_fault_everything_passes_and_is_counted() {
    let (proxy, src, (dst, err)) = run(None);
    assert_eq!(src.unwrap(), [Kind::Hello, Kind::Ready, Kind::Resumed]);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(dst.len(), 12);
    assert!(proxy.wait_done(T));
    let c = proxy.counts();
    assert_eq!(c.frames(Direction::ToDestination, Kind::Memory), 4);
    assert_eq!(c.frames(Direction::ToDestination, Kind::RoundEnd), 2);
    assert_eq!(c.frames(Direction::ToSource, Kind::Resumed), 1);
    assert!(c.bytes(Direction::ToDestination) > 4 * 4096);
    assert!(!proxy.reached());
    assert!(proxy.error().is_none());
}

#[test]
fn a_cut_at_the_third_memory_frame_of_round_0_stops_both_sides_there() {
    let (proxy, src, (dst, err)) = run(Some(Fault {
        at: Position::round0(3),
        action: Action::Cut,
    }));
    assert!(proxy.reached());
    assert!(src.is_err());
    assert!(matches!(err, Some(MigrationError::Io { .. })), "{err:?}");
    assert_eq!(memory_frames(&dst), 2, "{dst:?}");
}

#[test]
fn a_flipped_bit_in_round_1s_round_end_fails_the_checksum() {
    let (proxy, src, (dst, err)) = run(Some(Fault {
        at: Position::RoundEnd(Rounds::Exactly(1)),
        action: Action::FlipBit,
    }));
    assert!(proxy.reached());
    let e = err
        .expect("the destination must refuse the frame")
        .to_string();
    assert!(e.contains("RoundEnd") && e.contains("checksum"), "{e}");
    assert_eq!(memory_frames(&dst), 4);
    drop(proxy); // the fake source waits for Ready; the proxy's end ends it
    assert!(src.is_err());
}

#[test]
fn a_flipped_bit_in_an_empty_frame_hits_the_checksum() {
    let (proxy, _src, (_dst, err)) = run(Some(Fault {
        at: Position::go(),
        action: Action::FlipBit,
    }));
    assert!(proxy.reached());
    let e = err.expect("Go with a bad checksum").to_string();
    assert!(e.contains("Go") && e.contains("checksum"), "{e}");
}

#[test]
fn a_stall_keeps_the_connection_open_until_the_proxy_closes() {
    let (proxy, src, dest) = spawn(Some(Fault {
        at: Position::device_state(),
        action: Action::Stall,
    }));
    assert!(proxy.wait_reached(T));
    // Nothing was cut: both peers are still waiting, the destination for the rest.
    assert!(!dest.is_finished() && !src.is_finished());
    assert_eq!(
        proxy
            .counts()
            .frames(Direction::ToDestination, Kind::DeviceState),
        1
    );
    proxy.close();
    let (dst, err) = dest.join().unwrap();
    assert!(!dst.contains(&Kind::DeviceState), "{dst:?}");
    assert!(err.is_some());
    assert!(src.join().unwrap().is_err());
}

#[test]
fn a_held_ready_waits_for_the_harness_then_goes_on() {
    let (proxy, src, dest) = spawn(Some(Fault {
        at: Position::ready(),
        action: Action::Hold,
    }));
    assert_eq!(proxy.wait_held(T), Some(Position::ready()));
    assert!(!src.is_finished(), "Ready is held back");
    assert_eq!(proxy.counts().frames(Direction::ToDestination, Kind::Go), 0);
    proxy.release(Verdict::Forward);
    assert_eq!(
        src.join().unwrap().unwrap(),
        [Kind::Hello, Kind::Ready, Kind::Resumed]
    );
    assert!(dest.join().unwrap().1.is_none());
}

#[test]
fn a_held_frame_can_be_cut() {
    let (proxy, src, dest) = spawn(Some(Fault {
        at: Position::later_round(),
        action: Action::Hold,
    }));
    assert!(proxy.wait_held(T).is_some());
    proxy.release(Verdict::Cut);
    let (dst, err) = dest.join().unwrap();
    assert_eq!(memory_frames(&dst), 3, "round 0 only: {dst:?}");
    assert!(err.is_some());
    assert!(src.join().unwrap().is_err());
}

#[test]
fn cut_after_go_delivers_go_and_loses_resumed() {
    let (proxy, src, (dst, err)) = run(Some(Fault {
        at: Position::go(),
        action: Action::CutAfter,
    }));
    assert!(proxy.reached());
    assert_eq!(dst.last(), Some(&Kind::Go), "the destination got Go");
    // Its Resumed may or may not have been written before the cut; it never arrives.
    let _ = err;
    assert!(src.is_err(), "the source never sees Resumed");
    assert_eq!(proxy.counts().frames(Direction::ToDestination, Kind::Go), 1);
}

#[test]
fn a_position_the_migration_never_reaches_is_reported_as_such() {
    let (proxy, src, _) = run(Some(Fault {
        at: Position::Memory {
            rounds: Rounds::Exactly(5),
            nth: 1,
        },
        action: Action::Cut,
    }));
    assert!(src.is_ok());
    assert!(proxy.wait_done(T));
    assert!(!proxy.wait_reached(Duration::ZERO));
}
