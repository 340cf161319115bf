//! Layout tests of every CM message: each field at the offset IBA / Linux give it, nothing
//! else touched, and build → parse → build is the identity. (About 1 000 lines, on purpose in
//! one file: the generic `Msg` checks and the per-message offset tables read side by side;
//! each message's table is short, there are eleven of them.)

use super::*;
use crate::mad::class;
use core::fmt::Debug;
use std::string::ToString;
use std::vec::Vec;

/// What the generic tests need of a message struct.
trait Msg: Copy + PartialEq + Debug + Default {
    const ATTR: u16;
    fn parse_it(b: &[u8]) -> Result<Self, WireError>;
    fn mad(&self) -> Mad;
}

macro_rules! msg_impl {
    ($($ty:ident),*) => {$(
        impl Msg for $ty {
            const ATTR: u16 = $ty::ATTRIBUTE_ID;
            fn parse_it(b: &[u8]) -> Result<Self, WireError> {
                $ty::parse(b)
            }
            fn mad(&self) -> Mad {
                self.to_mad()
            }
        }
    )*};
}
msg_impl!(Req, Mra, Rej, Rep, Rtu, Dreq, Drep, SidrReq, SidrRep, Lap, Apr);

type Case<T> = (&'static str, fn(&mut T), &'static [(usize, &'static [u8])]);

/// For each case: set the field on a default message, build, and compare with the default
/// MAD patched at exactly the given offsets; then parse back to the same struct.
fn check_fields<T: Msg>(cases: &[Case<T>]) {
    let base = T::default();
    let base_mad = base.mad();
    assert_eq!(&base_mad[..4], &[1, class::CM, 2, 3]);
    assert_eq!(&base_mad[16..18], &T::ATTR.to_be_bytes());
    assert!(base_mad[24..].iter().all(|&b| b == 0));
    for (name, set, patches) in cases {
        let mut m = base;
        set(&mut m);
        let got = m.mad();
        let mut expected = base_mad;
        for (off, bytes) in patches.iter() {
            expected[*off..*off + bytes.len()].copy_from_slice(bytes);
        }
        for (i, (g, e)) in got.iter().zip(expected.iter()).enumerate() {
            assert_eq!(g, e, "{name}: byte {i} is 0x{g:02x}, expected 0x{e:02x}");
        }
        assert_eq!(T::parse_it(&got), Ok(m), "{name}: parse back");
    }
}

/// Deterministic pseudo-random bytes (xorshift64).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next() as u8;
        }
    }
}

/// Random MADs with the right class and attribute: parse → build → parse gives the same
/// struct, and build is then a fixed point.
fn check_round_trip<T: Msg>() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ u64::from(T::ATTR));
    for _ in 0..200 {
        let mut mad = [0u8; MAD_SIZE];
        rng.fill(&mut mad);
        mad[1] = class::CM;
        mad[16..18].copy_from_slice(&T::ATTR.to_be_bytes());
        let a = T::parse_it(&mad).unwrap();
        let built = a.mad();
        let b = T::parse_it(&built).unwrap();
        assert_eq!(a, b);
        assert_eq!(b.mad(), built);
        // Header bytes, including the reserved ones, survive.
        assert_eq!(&built[..24], &mad[..24]);
    }
}

/// Every wrong length, class and attribute ID is an error naming the value.
fn check_rejects<T: Msg>() {
    let good = T::default().mad();
    for n in 0..MAD_SIZE {
        assert_eq!(
            T::parse_it(&good[..n]),
            Err(WireError::TooShort {
                what: "MAD",
                len: n,
                need: MAD_SIZE
            })
        );
    }
    let mut long = Vec::from(good);
    long.push(0);
    assert!(matches!(
        T::parse_it(&long),
        Err(WireError::TooLong { len: 257, .. })
    ));
    let mut bad = good;
    bad[1] = class::SUBN_ADM;
    assert_eq!(
        T::parse_it(&bad),
        Err(WireError::WrongMgmtClass {
            class: 3,
            expected: 7
        })
    );
    let mut bad = good;
    bad[16..18].copy_from_slice(&0x0099u16.to_be_bytes());
    let err = T::parse_it(&bad).unwrap_err();
    assert!(matches!(
        err,
        WireError::WrongAttribute { attr: 0x0099, .. }
    ));
    assert!(err
        .to_string()
        .starts_with("unexpected attribute id 0x0099 for "));
}

const GID_A: [u8; 16] = [
    0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab, 0xac, 0xad, 0xae, 0xaf,
];
const GID_B: [u8; 16] = [
    0xb0, 0xb1, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba, 0xbb, 0xbc, 0xbd, 0xbe, 0xbf,
];

#[test]
fn req_fields() {
    check_fields::<Req>(&[
        (
            "hdr.tid",
            |m| m.hdr.transaction_id = 0x0102_0304_0506_0708,
            &[(8, &[1, 2, 3, 4, 5, 6, 7, 8])],
        ),
        ("hdr.method", |m| m.hdr.method = 0x81, &[(3, &[0x81])]),
        (
            "hdr.status",
            |m| m.hdr.status = 0x1234,
            &[(4, &[0x12, 0x34])],
        ),
        (
            "hdr.modifier",
            |m| m.hdr.attribute_modifier = 0xdead_beef,
            &[(20, &[0xde, 0xad, 0xbe, 0xef])],
        ),
        (
            "local_comm_id",
            |m| m.local_comm_id = 0xbcf3_10e5,
            &[(24, &[0xbc, 0xf3, 0x10, 0xe5])],
        ),
        (
            "vendor_id",
            |m| m.vendor_id = 0xa1b2c3,
            &[(29, &[0xa1, 0xb2, 0xc3])],
        ),
        (
            "service_id",
            |m| m.service_id = 0x1112_1314_1516_1718,
            &[(32, &[0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18])],
        ),
        (
            "local_ca_guid",
            |m| m.local_ca_guid = 0x2122_2324_2526_2728,
            &[(40, &[0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28])],
        ),
        (
            "local_qkey",
            |m| m.local_qkey = 0x3132_3334,
            &[(52, &[0x31, 0x32, 0x33, 0x34])],
        ),
        (
            "local_qpn",
            |m| m.local_qpn = 0xabcdef,
            &[(56, &[0xab, 0xcd, 0xef])],
        ),
        (
            "responder_resources",
            |m| m.responder_resources = 0x5a,
            &[(59, &[0x5a])],
        ),
        (
            "local_eecn",
            |m| m.local_eecn = 0x414243,
            &[(60, &[0x41, 0x42, 0x43])],
        ),
        (
            "initiator_depth",
            |m| m.initiator_depth = 0x77,
            &[(63, &[0x77])],
        ),
        (
            "remote_eecn",
            |m| m.remote_eecn = 0x515253,
            &[(64, &[0x51, 0x52, 0x53])],
        ),
        (
            "remote_cm_response_timeout",
            |m| m.remote_cm_response_timeout = 0x14,
            &[(67, &[0xa0])],
        ),
        (
            "transport_service_type",
            |m| m.transport_service_type = 3,
            &[(67, &[0x06])],
        ),
        (
            "end_to_end_flow_control",
            |m| m.end_to_end_flow_control = true,
            &[(67, &[0x01])],
        ),
        (
            "starting_psn",
            |m| m.starting_psn = 0xf9b3fb,
            &[(68, &[0xf9, 0xb3, 0xfb])],
        ),
        (
            "local_cm_response_timeout",
            |m| m.local_cm_response_timeout = 0x1f,
            &[(71, &[0xf8])],
        ),
        ("retry_count", |m| m.retry_count = 7, &[(71, &[0x07])]),
        ("p_key", |m| m.p_key = 0x8001, &[(72, &[0x80, 0x01])]),
        ("path_mtu", |m| m.path_mtu = 5, &[(74, &[0x50])]),
        ("rdc_exists", |m| m.rdc_exists = true, &[(74, &[0x08])]),
        (
            "rnr_retry_count",
            |m| m.rnr_retry_count = 6,
            &[(74, &[0x06])],
        ),
        (
            "max_cm_retries",
            |m| m.max_cm_retries = 15,
            &[(75, &[0xf0])],
        ),
        ("srq", |m| m.srq = true, &[(75, &[0x08])]),
        (
            "extended_transport_type",
            |m| m.extended_transport_type = 1,
            &[(75, &[0x01])],
        ),
        (
            "pri.local_lid",
            |m| m.primary_path.local_lid = 0xfffe,
            &[(76, &[0xff, 0xfe])],
        ),
        (
            "pri.remote_lid",
            |m| m.primary_path.remote_lid = 0x1234,
            &[(78, &[0x12, 0x34])],
        ),
        (
            "pri.local_gid",
            |m| m.primary_path.local_gid = Gid(GID_A),
            &[(80, &GID_A)],
        ),
        (
            "pri.remote_gid",
            |m| m.primary_path.remote_gid = Gid(GID_B),
            &[(96, &GID_B)],
        ),
        (
            "pri.flow_label",
            |m| m.primary_path.flow_label = 0xabcde,
            &[(112, &[0xab, 0xcd, 0xe0])],
        ),
        (
            "pri.packet_rate",
            |m| m.primary_path.packet_rate = 0x3f,
            &[(115, &[0x3f])],
        ),
        (
            "pri.traffic_class",
            |m| m.primary_path.traffic_class = 0xb8,
            &[(116, &[0xb8])],
        ),
        (
            "pri.hop_limit",
            |m| m.primary_path.hop_limit = 0x40,
            &[(117, &[0x40])],
        ),
        ("pri.sl", |m| m.primary_path.sl = 0xf, &[(118, &[0xf0])]),
        (
            "pri.subnet_local",
            |m| m.primary_path.subnet_local = true,
            &[(118, &[0x08])],
        ),
        (
            "pri.local_ack_timeout",
            |m| m.primary_path.local_ack_timeout = 0x13,
            &[(119, &[0x98])],
        ),
        (
            "alt.local_lid",
            |m| m.alternate_path.local_lid = 0xfffe,
            &[(120, &[0xff, 0xfe])],
        ),
        (
            "alt.remote_lid",
            |m| m.alternate_path.remote_lid = 0x1234,
            &[(122, &[0x12, 0x34])],
        ),
        (
            "alt.local_gid",
            |m| m.alternate_path.local_gid = Gid(GID_A),
            &[(124, &GID_A)],
        ),
        (
            "alt.remote_gid",
            |m| m.alternate_path.remote_gid = Gid(GID_B),
            &[(140, &GID_B)],
        ),
        (
            "alt.flow_label",
            |m| m.alternate_path.flow_label = 0xabcde,
            &[(156, &[0xab, 0xcd, 0xe0])],
        ),
        (
            "alt.packet_rate",
            |m| m.alternate_path.packet_rate = 0x3f,
            &[(159, &[0x3f])],
        ),
        (
            "alt.traffic_class",
            |m| m.alternate_path.traffic_class = 0xb8,
            &[(160, &[0xb8])],
        ),
        (
            "alt.hop_limit",
            |m| m.alternate_path.hop_limit = 0x40,
            &[(161, &[0x40])],
        ),
        ("alt.sl", |m| m.alternate_path.sl = 0xf, &[(162, &[0xf0])]),
        (
            "alt.subnet_local",
            |m| m.alternate_path.subnet_local = true,
            &[(162, &[0x08])],
        ),
        (
            "alt.local_ack_timeout",
            |m| m.alternate_path.local_ack_timeout = 0x13,
            &[(163, &[0x98])],
        ),
        (
            "sap_supported",
            |m| m.sap_supported = true,
            &[(163, &[0x04])],
        ),
        (
            "private_data",
            |m| {
                m.private_data[0] = 0xaa;
                m.private_data[91] = 0xbb;
            },
            &[(164, &[0xaa]), (255, &[0xbb])],
        ),
    ]);
}

#[test]
fn req_alternate_ack_timeout_and_sap_share_a_byte() {
    let mut m = Req::default();
    m.alternate_path.local_ack_timeout = 0x1f;
    m.sap_supported = true;
    let mad = m.to_mad();
    assert_eq!(mad[163], 0xfc);
    assert_eq!(Req::parse(&mad), Ok(m));
}

#[test]
fn bit_fields_are_truncated_to_their_width() {
    let m = Req {
        local_qpn: 0xff12_3456,
        retry_count: 0xff,
        local_cm_response_timeout: 0,
        ..Req::default()
    };
    let mad = m.to_mad();
    assert_eq!(&mad[56..59], &[0x12, 0x34, 0x56]);
    assert_eq!(mad[71], 0x07);
    let p = Req::parse(&mad).unwrap();
    assert_eq!(p.local_qpn, 0x123456);
    assert_eq!(p.retry_count, 7);
}

#[test]
fn mra_fields() {
    check_fields::<Mra>(&[
        (
            "local_comm_id",
            |m| m.local_comm_id = 0x0102_0304,
            &[(24, &[1, 2, 3, 4])],
        ),
        (
            "remote_comm_id",
            |m| m.remote_comm_id = 0x0506_0708,
            &[(28, &[5, 6, 7, 8])],
        ),
        (
            "message_mraed",
            |m| m.message_mraed = msg::OTHER,
            &[(32, &[0x80])],
        ),
        (
            "service_timeout",
            |m| m.service_timeout = 0x1f,
            &[(33, &[0xf8])],
        ),
        (
            "private_data",
            |m| {
                m.private_data[0] = 0xaa;
                m.private_data[221] = 0xbb;
            },
            &[(34, &[0xaa]), (255, &[0xbb])],
        ),
    ]);
}

#[test]
fn rej_fields() {
    check_fields::<Rej>(&[
        (
            "local_comm_id",
            |m| m.local_comm_id = 0x0102_0304,
            &[(24, &[1, 2, 3, 4])],
        ),
        (
            "remote_comm_id",
            |m| m.remote_comm_id = 0x0506_0708,
            &[(28, &[5, 6, 7, 8])],
        ),
        (
            "message_rejected",
            |m| m.message_rejected = msg::REP,
            &[(32, &[0x40])],
        ),
        (
            "rejected_info_length",
            |m| m.rejected_info_length = 0x7f,
            &[(33, &[0xfe])],
        ),
        (
            "reason",
            |m| m.reason = reason::CONSUMER_DEFINED,
            &[(34, &[0, 28])],
        ),
        (
            "ari",
            |m| {
                m.ari[0] = 0xa1;
                m.ari[71] = 0xa2;
            },
            &[(36, &[0xa1]), (107, &[0xa2])],
        ),
        (
            "private_data",
            |m| {
                m.private_data[0] = 0xaa;
                m.private_data[147] = 0xbb;
            },
            &[(108, &[0xaa]), (255, &[0xbb])],
        ),
    ]);
}

#[test]
fn rep_fields() {
    check_fields::<Rep>(&[
        (
            "local_comm_id",
            |m| m.local_comm_id = 0xb2ab_03de,
            &[(24, &[0xb2, 0xab, 0x03, 0xde])],
        ),
        (
            "remote_comm_id",
            |m| m.remote_comm_id = 0xbcf3_10e5,
            &[(28, &[0xbc, 0xf3, 0x10, 0xe5])],
        ),
        (
            "local_qkey",
            |m| m.local_qkey = 0x3132_3334,
            &[(32, &[0x31, 0x32, 0x33, 0x34])],
        ),
        (
            "local_qpn",
            |m| m.local_qpn = 0xabcdef,
            &[(36, &[0xab, 0xcd, 0xef])],
        ),
        (
            "vendor_id",
            |m| m.vendor_id = 0xa1b2c3,
            &[(39, &[0xa1]), (43, &[0xb2]), (47, &[0xc3])],
        ),
        (
            "local_eecn",
            |m| m.local_eecn = 0x414243,
            &[(40, &[0x41, 0x42, 0x43])],
        ),
        (
            "starting_psn",
            |m| m.starting_psn = 0x96fb0c,
            &[(44, &[0x96, 0xfb, 0x0c])],
        ),
        (
            "responder_resources",
            |m| m.responder_resources = 0x5a,
            &[(48, &[0x5a])],
        ),
        (
            "initiator_depth",
            |m| m.initiator_depth = 0x77,
            &[(49, &[0x77])],
        ),
        (
            "target_ack_delay",
            |m| m.target_ack_delay = 0x0f,
            &[(50, &[0x78])],
        ),
        (
            "failover_accepted",
            |m| m.failover_accepted = 3,
            &[(50, &[0x06])],
        ),
        (
            "end_to_end_flow_control",
            |m| m.end_to_end_flow_control = true,
            &[(50, &[0x01])],
        ),
        (
            "rnr_retry_count",
            |m| m.rnr_retry_count = 7,
            &[(51, &[0xe0])],
        ),
        ("srq", |m| m.srq = true, &[(51, &[0x10])]),
        (
            "local_ca_guid",
            |m| m.local_ca_guid = 0x5054_00ff_fe11_0001,
            &[(52, &[0x50, 0x54, 0x00, 0xff, 0xfe, 0x11, 0x00, 0x01])],
        ),
        (
            "private_data",
            |m| {
                m.private_data[0] = 0xaa;
                m.private_data[195] = 0xbb;
            },
            &[(60, &[0xaa]), (255, &[0xbb])],
        ),
    ]);
}

#[test]
fn rtu_fields() {
    check_fields::<Rtu>(&[
        (
            "local_comm_id",
            |m| m.local_comm_id = 0x0102_0304,
            &[(24, &[1, 2, 3, 4])],
        ),
        (
            "remote_comm_id",
            |m| m.remote_comm_id = 0x0506_0708,
            &[(28, &[5, 6, 7, 8])],
        ),
        (
            "private_data",
            |m| {
                m.private_data[0] = 0xaa;
                m.private_data[223] = 0xbb;
            },
            &[(32, &[0xaa]), (255, &[0xbb])],
        ),
    ]);
}

#[test]
fn dreq_fields() {
    check_fields::<Dreq>(&[
        (
            "local_comm_id",
            |m| m.local_comm_id = 0x0102_0304,
            &[(24, &[1, 2, 3, 4])],
        ),
        (
            "remote_comm_id",
            |m| m.remote_comm_id = 0x0506_0708,
            &[(28, &[5, 6, 7, 8])],
        ),
        (
            "remote_qpn",
            |m| m.remote_qpn = 0xabcdef,
            &[(32, &[0xab, 0xcd, 0xef])],
        ),
        (
            "private_data",
            |m| {
                m.private_data[0] = 0xaa;
                m.private_data[219] = 0xbb;
            },
            &[(36, &[0xaa]), (255, &[0xbb])],
        ),
    ]);
}

#[test]
fn drep_fields() {
    check_fields::<Drep>(&[
        (
            "local_comm_id",
            |m| m.local_comm_id = 0x0102_0304,
            &[(24, &[1, 2, 3, 4])],
        ),
        (
            "remote_comm_id",
            |m| m.remote_comm_id = 0x0506_0708,
            &[(28, &[5, 6, 7, 8])],
        ),
        (
            "private_data",
            |m| {
                m.private_data[0] = 0xaa;
                m.private_data[223] = 0xbb;
            },
            &[(32, &[0xaa]), (255, &[0xbb])],
        ),
    ]);
}

#[test]
fn sidr_req_fields() {
    check_fields::<SidrReq>(&[
        (
            "request_id",
            |m| m.request_id = 0x0102_0304,
            &[(24, &[1, 2, 3, 4])],
        ),
        ("p_key", |m| m.p_key = 0xffff, &[(28, &[0xff, 0xff])]),
        (
            "service_id",
            |m| m.service_id = 0x1112_1314_1516_1718,
            &[(32, &[0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18])],
        ),
        (
            "private_data",
            |m| {
                m.private_data[0] = 0xaa;
                m.private_data[215] = 0xbb;
            },
            &[(40, &[0xaa]), (255, &[0xbb])],
        ),
    ]);
}

#[test]
fn sidr_rep_fields() {
    check_fields::<SidrRep>(&[
        (
            "request_id",
            |m| m.request_id = 0x0102_0304,
            &[(24, &[1, 2, 3, 4])],
        ),
        (
            "status",
            |m| m.status = sidr_status::REDIRECT,
            &[(28, &[4])],
        ),
        (
            "additional_info_length",
            |m| m.additional_info_length = 0x48,
            &[(29, &[0x48])],
        ),
        (
            "vendor_id",
            |m| m.vendor_id = 0xa1b2c3,
            &[(30, &[0xa1, 0xb2]), (35, &[0xc3])],
        ),
        ("qpn", |m| m.qpn = 0xabcdef, &[(32, &[0xab, 0xcd, 0xef])]),
        (
            "service_id",
            |m| m.service_id = 0x1112_1314_1516_1718,
            &[(36, &[0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18])],
        ),
        (
            "qkey",
            |m| m.qkey = 0x0123_4567,
            &[(44, &[0x01, 0x23, 0x45, 0x67])],
        ),
        (
            "additional_info",
            |m| {
                m.additional_info[0] = 0xa1;
                m.additional_info[71] = 0xa2;
            },
            &[(48, &[0xa1]), (119, &[0xa2])],
        ),
        (
            "private_data",
            |m| {
                m.private_data[0] = 0xaa;
                m.private_data[135] = 0xbb;
            },
            &[(120, &[0xaa]), (255, &[0xbb])],
        ),
    ]);
}

#[test]
fn lap_fields() {
    check_fields::<Lap>(&[
        (
            "local_comm_id",
            |m| m.local_comm_id = 0x0102_0304,
            &[(24, &[1, 2, 3, 4])],
        ),
        (
            "remote_comm_id",
            |m| m.remote_comm_id = 0x0506_0708,
            &[(28, &[5, 6, 7, 8])],
        ),
        (
            "remote_qpn",
            |m| m.remote_qpn = 0xabcdef,
            &[(36, &[0xab, 0xcd, 0xef])],
        ),
        (
            "remote_cm_response_timeout",
            |m| m.remote_cm_response_timeout = 0x1f,
            &[(39, &[0xf8])],
        ),
        (
            "alt.local_lid",
            |m| m.alternate_path.local_lid = 0xfffe,
            &[(44, &[0xff, 0xfe])],
        ),
        (
            "alt.remote_lid",
            |m| m.alternate_path.remote_lid = 0x1234,
            &[(46, &[0x12, 0x34])],
        ),
        (
            "alt.local_gid",
            |m| m.alternate_path.local_gid = Gid(GID_A),
            &[(48, &GID_A)],
        ),
        (
            "alt.remote_gid",
            |m| m.alternate_path.remote_gid = Gid(GID_B),
            &[(64, &GID_B)],
        ),
        (
            "alt.flow_label",
            |m| m.alternate_path.flow_label = 0xabcde,
            &[(80, &[0xab, 0xcd, 0xe0])],
        ),
        (
            "alt.traffic_class",
            |m| m.alternate_path.traffic_class = 0xb8,
            &[(83, &[0xb8])],
        ),
        (
            "alt.hop_limit",
            |m| m.alternate_path.hop_limit = 0x40,
            &[(84, &[0x40])],
        ),
        (
            "alt.packet_rate",
            |m| m.alternate_path.packet_rate = 0x3f,
            &[(85, &[0x3f])],
        ),
        ("alt.sl", |m| m.alternate_path.sl = 0xf, &[(86, &[0xf0])]),
        (
            "alt.subnet_local",
            |m| m.alternate_path.subnet_local = true,
            &[(86, &[0x08])],
        ),
        (
            "alt.local_ack_timeout",
            |m| m.alternate_path.local_ack_timeout = 0x13,
            &[(87, &[0x98])],
        ),
        (
            "private_data",
            |m| {
                m.private_data[0] = 0xaa;
                m.private_data[167] = 0xbb;
            },
            &[(88, &[0xaa]), (255, &[0xbb])],
        ),
    ]);
}

#[test]
fn apr_fields() {
    check_fields::<Apr>(&[
        (
            "local_comm_id",
            |m| m.local_comm_id = 0x0102_0304,
            &[(24, &[1, 2, 3, 4])],
        ),
        (
            "remote_comm_id",
            |m| m.remote_comm_id = 0x0506_0708,
            &[(28, &[5, 6, 7, 8])],
        ),
        (
            "additional_info_length",
            |m| m.additional_info_length = 0x48,
            &[(32, &[0x48])],
        ),
        (
            "ap_status",
            |m| m.ap_status = apr_status::INVALID_SL,
            &[(33, &[13])],
        ),
        (
            "additional_info",
            |m| {
                m.additional_info[0] = 0xa1;
                m.additional_info[71] = 0xa2;
            },
            &[(36, &[0xa1]), (107, &[0xa2])],
        ),
        (
            "private_data",
            |m| {
                m.private_data[0] = 0xaa;
                m.private_data[147] = 0xbb;
            },
            &[(108, &[0xaa]), (255, &[0xbb])],
        ),
    ]);
}

#[test]
fn round_trips() {
    check_round_trip::<Req>();
    check_round_trip::<Mra>();
    check_round_trip::<Rej>();
    check_round_trip::<Rep>();
    check_round_trip::<Rtu>();
    check_round_trip::<Dreq>();
    check_round_trip::<Drep>();
    check_round_trip::<SidrReq>();
    check_round_trip::<SidrRep>();
    check_round_trip::<Lap>();
    check_round_trip::<Apr>();
}

#[test]
fn rejections() {
    check_rejects::<Req>();
    check_rejects::<Mra>();
    check_rejects::<Rej>();
    check_rejects::<Rep>();
    check_rejects::<Rtu>();
    check_rejects::<Dreq>();
    check_rejects::<Drep>();
    check_rejects::<SidrReq>();
    check_rejects::<SidrRep>();
    check_rejects::<Lap>();
    check_rejects::<Apr>();
}

#[test]
fn build_forces_class_and_attribute() {
    let m = Rtu {
        hdr: MadHeader {
            mgmt_class: 0x03,
            attribute_id: 0x0099,
            ..MadHeader::cm(attr::RTU, 5)
        },
        ..Rtu::default()
    };
    let mad = m.to_mad();
    assert_eq!(mad[1], 0x07);
    assert_eq!(&mad[16..18], &[0x00, 0x14]);
}

#[test]
fn cm_message_dispatch_and_accessors() {
    let req = Req {
        local_comm_id: 0x11,
        primary_path: CmPath {
            local_gid: Gid(GID_A),
            remote_gid: Gid(GID_B),
            ..CmPath::default()
        },
        service_id: 0x0106_1c06,
        ..Req::default()
    };
    let rej = Rej {
        local_comm_id: 0x22,
        remote_comm_id: 0,
        reason: reason::TIMEOUT,
        ..Rej::default()
    };
    let sidr = SidrRep {
        request_id: 0x33,
        ..SidrRep::default()
    };
    let all: [CmMessage; 11] = [
        req.into(),
        Mra::default().into(),
        rej.into(),
        Rep::default().into(),
        Rtu::default().into(),
        Dreq::default().into(),
        Drep::default().into(),
        SidrReq::default().into(),
        sidr.into(),
        Lap::default().into(),
        Apr::default().into(),
    ];
    for (msg, kind) in all.iter().zip(CmKind::ALL) {
        assert_eq!(msg.kind(), kind);
        assert_eq!(msg.header().attribute_id, kind.attribute_id());
        assert_eq!(CmKind::from_attribute_id(kind.attribute_id()), Some(kind));
        let mad = msg.to_mad();
        assert_eq!(CmMessage::parse_mad(&mad), Ok(*msg));
        assert_eq!(CmMessage::try_from(&mad[..]), Ok(*msg));
        assert_eq!(
            msg.remote_comm_id().is_some(),
            kind.carries_remote_comm_id()
        );
        assert_eq!(
            msg.local_comm_id().is_some(),
            msg.sidr_request_id().is_none()
        );
        let mut marked = *msg;
        if let Some(b) = marked.private_data_mut().first_mut() {
            *b = 0x5a;
        }
        assert_eq!(marked.to_mad()[kind.private_data_offset()], 0x5a);
        assert_eq!(
            msg.private_data().len() + kind.private_data_offset(),
            MAD_SIZE
        );
    }
    assert_eq!(all[0].local_comm_id(), Some(0x11));
    assert_eq!(all[0].remote_comm_id(), None);
    assert_eq!(all[0].primary_local_gid(), Some(Gid(GID_A)));
    assert_eq!(all[0].primary_remote_gid(), Some(Gid(GID_B)));
    assert_eq!(all[0].service_id(), Some(0x0106_1c06));
    assert_eq!(all[1].primary_local_gid(), None);
    // A REJ with remote ID 0 (timeout) still has a remote ID, just 0.
    assert_eq!(all[2].remote_comm_id(), Some(0));
    assert_eq!(all[8].sidr_request_id(), Some(0x33));
    assert_eq!(all[8].local_comm_id(), None);
    assert_eq!(CmKind::from_attribute_id(attr::CLASS_PORT_INFO), None);
    assert_eq!(CmKind::SidrRep.to_string(), "SIDR_REP");

    let mut m = all[4];
    m.header_mut().transaction_id = 9;
    assert_eq!(&m.to_mad()[8..16], &[0, 0, 0, 0, 0, 0, 0, 9]);
}

#[test]
fn parse_mad_errors() {
    let mut mad = Rtu::default().to_mad();
    mad[16..18].copy_from_slice(&attr::CLASS_PORT_INFO.to_be_bytes());
    assert_eq!(
        CmMessage::parse_mad(&mad),
        Err(WireError::UnknownCmAttribute { attr: 1 })
    );
    mad[16..18].copy_from_slice(&0x0099u16.to_be_bytes());
    assert_eq!(
        CmMessage::parse_mad(&mad).unwrap_err().to_string(),
        "unknown CM attribute id 0x0099"
    );
    mad[1] = 0x81;
    assert_eq!(
        CmMessage::parse_mad(&mad).unwrap_err().to_string(),
        "unexpected management class 0x81, expected 0x07"
    );
    assert_eq!(
        CmMessage::parse_mad(&mad[..120]).unwrap_err().to_string(),
        "MAD too short: 120 bytes, need 256"
    );
    for n in 0..MAD_SIZE {
        assert!(CmMessage::parse_mad(&mad[..n]).is_err());
    }
}
