//! Measures what SDP work costs on a media thread: building a peer (done off the media
//! threads), creating an SFU offer for pulled tracks, and accepting a client offer.
//! Run: `cargo run --release -p opencalls-sfu --example negotiation_cost`

use std::time::Instant;

use opencalls_sfu::peer::NewMedia;
use opencalls_sfu::{Certificate, Kind, Peer, PeerConfig};

fn main() {
    let config = PeerConfig {
        certificate: Certificate::generate().expect("certificate"),
        candidates: vec!["127.0.0.1:50000".parse().expect("addr")],
        ingress: Default::default(),
    };
    for round in 0..3 {
        let t = Instant::now();
        let mut peer = Peer::new(&config, Instant::now()).expect("peer");
        let build = t.elapsed();
        let medias: Vec<NewMedia> = [Kind::Audio, Kind::Video]
            .iter()
            .map(|k| NewMedia {
                kind: *k,
                flow: opencalls_sfu::peer::Flow::Send,
                stream_id: "s".into(),
                track_id: "t".into(),
            })
            .collect();
        let t = Instant::now();
        let (offer, _) = peer.create_offer(&medias).expect("offer");
        let first_offer = t.elapsed();
        peer.rollback_offer();
        let t = Instant::now();
        let _ = peer.create_offer(&medias).expect("offer");
        let second_offer = t.elapsed();
        println!(
            "round {round}: build {build:?}, first SFU offer {first_offer:?}, second {second_offer:?}, offer {} bytes",
            offer.len()
        );
    }
}
