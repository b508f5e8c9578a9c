//! The join token gates node-to-node traffic: three nodes started with a
//! token replicate (their transports present it), and a `Raft` call without
//! it, or with another token, is refused before it reaches a replica.

mod support;

use std::collections::BTreeMap;

use ballast_proto::pb::raft_client::RaftClient;
use ballast_proto::{pb, PresentToken};
use ballast_raft::{BallastNode, NodeId};
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::SeedableRng;

use support::*;

const TOKEN: &str = "s3cret+/=";

fn hello() -> pb::NodeHello {
    pb::NodeHello {
        cluster_id: CLUSTER.0,
        node_id: 9,
        addr: "127.0.0.1:1".into(),
        protocol_version: ballast_types::PROTOCOL_VERSION,
    }
}

fn vote() -> pb::RaftRequest {
    pb::RaftRequest { cluster_id: CLUSTER.0, from_node: 9, target_node: 1, group: 1, payload: Bytes::from_static(b"x") }
}

fn assert_refused<T: std::fmt::Debug>(what: &str, r: Result<T, tonic::Status>) {
    let e = r.expect_err(what);
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{what}: {e:?}");
    assert_eq!(e.message(), "join token missing or wrong", "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raft_calls_without_the_join_token_are_refused() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("tempdir")).collect();
    let mut nodes = BTreeMap::new();
    for (i, d) in dirs.iter().enumerate() {
        let id = i as NodeId + 1;
        let node = start_node_with(id, d.path(), "127.0.0.1:0".parse().expect("addr"), |c| {
            c.join_token = Some(TOKEN.into());
        })
        .await;
        for shard in SHARDS {
            node.create_shard_replica(shard).await.expect("start replica");
        }
        nodes.insert(id, node);
    }
    let members: BTreeMap<NodeId, BallastNode> = nodes.iter().map(|(id, n)| (*id, n.node_info())).collect();
    for shard in SHARDS {
        nodes[&1].initialize_shard(shard, members.clone()).await.expect("initialize");
    }
    // Elections and replication need the token on every Raft call: writes
    // are acknowledged only once a majority holds them.
    let addrs: Vec<String> = nodes.values().map(|n| n.advertise().to_string()).collect();
    let mut client = Client::new(addrs.clone());
    let mut model = vec![0u8; VOLUME_SIZE as usize];
    for _ in 0..20 {
        random_write(&mut client, &mut rng, &mut model, 1).await;
    }
    check_reads(&mut client, &mut rng, &model, seed).await;

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", addrs[0]))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut bare = RaftClient::new(channel.clone());
    assert_refused("hello without a token", bare.hello(hello()).await);
    assert_refused("vote without a token", bare.vote(vote()).await);
    assert_refused("append without a token", bare.append_entries(vote()).await);
    let wrong = PresentToken::new(Some("wrong-token")).expect("token");
    let mut wrong = ballast_proto::peer_client(channel.clone(), &wrong);
    assert_refused("hello with a wrong token", wrong.hello(hello()).await);
    assert_refused("vote with a wrong token", wrong.pre_vote(vote()).await);

    let right = PresentToken::new(Some(TOKEN)).expect("token");
    let reply = ballast_proto::peer_client(channel, &right).hello(hello()).await.expect("hello with the token");
    assert!(reply.get_ref().error.is_none(), "{:?}", reply.get_ref().error);
    assert_eq!(reply.get_ref().node_id, 1);

    for (_, n) in nodes {
        n.shutdown().await.expect("shutdown");
    }
}
