//! [`MapPlacement`]: routing with the cluster's placement map, refetched when
//! the Data path sees it is out of date.

use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use ballast_types::{ApiError, ClusterId, ErrorCode, MapVersion, PlacementMap, PlacementReply, ShardId, VolumeId};

use crate::{AdminClient, ClientError, Placement};

/// Background refreshes start at most this often.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_millis(500);

/// A [`Placement`] backed by the meta group's [`PlacementMap`].
///
/// The map is a snapshot: it may lag the cluster (a volume just created, a
/// shard whose voters moved, a new leader). Routing answers from memory and
/// never blocks; [`Placement::stale`] (called by [`crate::RemoteVolume`]
/// when a node's answer suggests the map is out of date) starts a background
/// refetch, at most one at a time and at most one per 500 ms, so a failover
/// seen by many requests costs one `GetPlacement`. A map replaces the current
/// one only if its version is newer, so concurrent refreshes never go back in
/// time. Callers that need the newest map now (opening an export) call
/// [`MapPlacement::refresh`].
///
/// Shared by every volume of a process (`Arc`); background refreshes need a
/// Tokio runtime and are skipped without one.
pub struct MapPlacement {
    admin: AdminClient,
    /// To hand an owned reference to background refreshes.
    me: Weak<MapPlacement>,
    map: RwLock<Arc<PlacementMap>>,
    /// Learned from the first reply; a later reply from another cluster is
    /// refused rather than routed with.
    cluster: Mutex<Option<ClusterId>>,
    gate: Mutex<RefreshGate>,
}

impl std::fmt::Debug for MapPlacement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapPlacement").field("version", &self.map().version).finish()
    }
}

/// Whether a background refresh may start: none in flight and none started in
/// the last [`MIN_REFRESH_INTERVAL`].
#[derive(Debug, Default)]
struct RefreshGate {
    running: bool,
    last_start: Option<Instant>,
}

impl RefreshGate {
    fn try_start(&mut self, now: Instant) -> bool {
        if self.running || self.last_start.is_some_and(|t| now.saturating_duration_since(t) < MIN_REFRESH_INTERVAL) {
            return false;
        }
        self.running = true;
        self.last_start = Some(now);
        true
    }

    fn finish(&mut self) {
        self.running = false;
    }
}

impl MapPlacement {
    /// Fetch the map once and route with it.
    pub async fn connect(admin: AdminClient) -> Result<Arc<Self>, ClientError> {
        let reply = admin.placement(MapVersion(0)).await?;
        let Some(map) = reply.map else {
            return Err(ClientError::Api(ApiError::new(
                ErrorCode::Internal,
                "GetPlacement with version 0 answered without a map",
            )));
        };
        let me = Self::from_map(admin, map);
        *me.cluster.lock().unwrap_or_else(|e| e.into_inner()) = Some(reply.cluster);
        Ok(me)
    }

    /// Route with `map` (already validated, e.g. converted from the wire or
    /// built by hand in a test); later refreshes go through `admin`.
    pub fn from_map(admin: AdminClient, map: PlacementMap) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            admin,
            me: me.clone(),
            map: RwLock::new(Arc::new(map)),
            cluster: Mutex::new(None),
            gate: Mutex::new(RefreshGate::default()),
        })
    }

    /// The current map.
    pub fn map(&self) -> Arc<PlacementMap> {
        self.map.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Ask for a newer map than the current one and install it; when the
    /// cluster answers that ours is current, keep it. Returns the map in use
    /// afterwards. Retries like any Admin call ([`AdminClient`]).
    pub async fn refresh(&self) -> Result<Arc<PlacementMap>, ClientError> {
        let have = self.map().version;
        let reply = self.admin.placement(have).await?;
        self.install(reply)
    }

    fn install(&self, reply: PlacementReply) -> Result<Arc<PlacementMap>, ClientError> {
        {
            let mut cluster = self.cluster.lock().unwrap_or_else(|e| e.into_inner());
            match *cluster {
                Some(c) if c != reply.cluster => {
                    return Err(ClientError::Api(ApiError::new(
                        ErrorCode::WrongCluster,
                        format!("placement map from {} while routing for {c}", reply.cluster),
                    )))
                }
                _ => *cluster = Some(reply.cluster),
            }
        }
        let mut current = self.map.write().unwrap_or_else(|e| e.into_inner());
        if let Some(map) = reply.map {
            if map.version > current.version {
                tracing::debug!(from = %current.version, to = %map.version, "placement map updated");
                *current = Arc::new(map);
            }
        }
        Ok(current.clone())
    }

    /// Start a background refresh unless one is running or started recently.
    fn kick(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let Some(me) = self.me.upgrade() else { return };
        if !self.gate.lock().unwrap_or_else(|e| e.into_inner()).try_start(Instant::now()) {
            return;
        }
        runtime.spawn(async move {
            if let Err(e) = me.refresh().await {
                tracing::warn!("placement map refresh failed: {e}");
            }
            me.gate.lock().unwrap_or_else(|e| e.into_inner()).finish();
        });
    }
}

/// The shard of `chunk` of `volume` in `map`; `NO_SUCH_VOLUME` when the map
/// does not know the volume.
fn shard_in(map: &PlacementMap, volume: VolumeId, chunk: u64) -> Result<ShardId, ApiError> {
    map.shard_of(volume, chunk).ok_or_else(|| {
        let mut e = ApiError::new(ErrorCode::NoSuchVolume, format!("{volume} is not in placement map {}", map.version));
        e.map_version = Some(map.version);
        e
    })
}

/// The addresses of `shard`'s voters, the map's leader hint first; empty for
/// a shard the map does not know.
fn nodes_in(map: &PlacementMap, shard: ShardId) -> Vec<String> {
    let Some(info) = map.shards.get(&shard) else { return Vec::new() };
    let leader = info.leader.filter(|l| info.voters.contains(l));
    leader
        .into_iter()
        .chain(info.voters.iter().copied().filter(|v| Some(*v) != leader))
        .filter_map(|n| map.nodes.get(&n).cloned())
        .collect()
}

impl Placement for MapPlacement {
    fn shard_of(&self, volume: VolumeId, chunk: u64) -> Result<ShardId, ApiError> {
        let r = shard_in(&self.map(), volume, chunk);
        if r.is_err() {
            // Likely a volume created after our map: the next request may find it.
            self.kick();
        }
        r
    }

    fn nodes(&self, shard: ShardId) -> Vec<String> {
        nodes_in(&self.map(), shard)
    }

    fn stale(&self, shard: ShardId) {
        tracing::debug!(%shard, "placement map may be stale");
        self.kick();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ballast_types::{
        shard_index, Epoch, FailureDomain, NodeId, PoolId, PoolInfo, PoolSpec, ShardInfo, VolumeInfo,
        DEFAULT_CHUNK_SIZE,
    };

    use super::*;
    use crate::ClientConfig;

    /// Pool 1 with shards 10..14 over nodes 1-4 (shard 13 without a leader
    /// hint); volume 7 in it.
    fn sample_map() -> PlacementMap {
        let pool = PoolInfo {
            id: PoolId(1),
            spec: PoolSpec { name: "p".into(), replicas: 3, shards: 4, failure_domain: FailureDomain::Node },
            first_shard: ShardId(10),
        };
        let layout: [(&[u64], Option<u64>); 4] =
            [(&[1, 2, 3], Some(3)), (&[2, 3, 4], Some(2)), (&[1, 3, 4], Some(4)), (&[1, 2, 4], None)];
        let shards = layout
            .iter()
            .zip(10..)
            .map(|((voters, leader), id)| {
                let voters = voters.iter().copied().map(NodeId).collect();
                (
                    ShardId(id),
                    ShardInfo { id: ShardId(id), pool: PoolId(1), voters, leader: leader.map(NodeId), joining: vec![] },
                )
            })
            .collect();
        let volume = VolumeInfo {
            id: VolumeId(7),
            name: "vol".into(),
            size: 1 << 30,
            pool: PoolId(1),
            chunk_size: DEFAULT_CHUNK_SIZE,
            epoch: Epoch(2),
        };
        let map = PlacementMap {
            version: MapVersion(5),
            pools: BTreeMap::from([(PoolId(1), pool)]),
            volumes: BTreeMap::from([(VolumeId(7), volume)]),
            shards,
            nodes: (1..=4).map(|n| (NodeId(n), format!("n{n}:7000"))).collect(),
        };
        map.validate().expect("the sample map is valid");
        map
    }

    fn admin() -> AdminClient {
        AdminClient::new(vec!["n1:7000".into()], ClientConfig::default()).expect("admin")
    }

    #[test]
    fn chunks_route_to_the_pool_shard_the_hash_names() {
        let p = MapPlacement::from_map(admin(), sample_map());
        for chunk in 0..256 {
            let want = ShardId(10 + shard_index(VolumeId(7), chunk, 4));
            assert_eq!(p.shard_of(VolumeId(7), chunk).expect("known volume"), want);
        }
    }

    #[test]
    fn an_unknown_volume_is_no_such_volume() {
        let p = MapPlacement::from_map(admin(), sample_map());
        let e = p.shard_of(VolumeId(8), 0).expect_err("unknown volume");
        assert_eq!(e.code, ErrorCode::NoSuchVolume);
        assert_eq!(e.map_version, Some(MapVersion(5)));
    }

    #[test]
    fn nodes_list_the_voters_with_the_leader_hint_first() {
        let map = sample_map();
        let p = MapPlacement::from_map(admin(), map.clone());
        for (id, info) in &map.shards {
            let nodes = p.nodes(*id);
            let voters: Vec<String> = info.voters.iter().map(|v| map.nodes[v].clone()).collect();
            match info.leader {
                Some(l) => {
                    assert_eq!(nodes[0], map.nodes[&l], "{id}: leader first");
                    let mut rest = voters.clone();
                    rest.retain(|a| *a != nodes[0]);
                    assert_eq!(nodes[1..], rest[..], "{id}: then the other voters");
                }
                None => assert_eq!(nodes, voters, "{id}: no hint, the voters"),
            }
        }
        assert!(p.nodes(ShardId(99)).is_empty(), "unknown shard");
    }

    #[test]
    fn a_leader_hint_outside_the_voters_is_ignored() {
        let mut map = sample_map();
        let s = map.shards.get_mut(&ShardId(10)).expect("shard");
        let outsider = (1..=4).map(NodeId).find(|n| !s.voters.contains(n)).expect("a non-voter");
        s.leader = Some(outsider);
        let nodes = nodes_in(&map, ShardId(10));
        assert_eq!(nodes.len(), 3);
        assert!(!nodes.contains(&map.nodes[&outsider]));
    }

    #[test]
    fn only_newer_maps_from_the_same_cluster_are_installed() {
        let p = MapPlacement::from_map(admin(), sample_map());
        let mut newer = sample_map();
        newer.version = MapVersion(6);
        newer.volumes.get_mut(&VolumeId(7)).expect("vol").size = 2 << 30;
        let got = p.install(PlacementReply { cluster: ClusterId(1), map: Some(newer.clone()) }).expect("install");
        assert_eq!(got.version, MapVersion(6));
        // "You are current": keep ours.
        let got = p.install(PlacementReply { cluster: ClusterId(1), map: None }).expect("current");
        assert_eq!(*got, newer);
        // An older map (a slower concurrent refresh) does not win.
        let got = p.install(PlacementReply { cluster: ClusterId(1), map: Some(sample_map()) }).expect("older");
        assert_eq!(got.version, MapVersion(6));
        let e = p.install(PlacementReply { cluster: ClusterId(2), map: None }).expect_err("other cluster");
        assert!(matches!(e, ClientError::Api(ref a) if a.code == ErrorCode::WrongCluster), "{e}");
        assert_eq!(p.map().volumes[&VolumeId(7)].size, 2 << 30);
    }

    #[test]
    fn background_refreshes_are_one_at_a_time_and_paced() {
        let mut g = RefreshGate::default();
        let t0 = Instant::now();
        assert!(g.try_start(t0));
        assert!(!g.try_start(t0 + Duration::from_secs(5)), "one in flight");
        g.finish();
        assert!(!g.try_start(t0 + Duration::from_millis(100)), "too soon after the last start");
        assert!(g.try_start(t0 + MIN_REFRESH_INTERVAL));
    }

    #[test]
    fn stale_outside_a_runtime_does_nothing() {
        let p = MapPlacement::from_map(admin(), sample_map());
        p.stale(ShardId(10));
        assert!(!p.gate.lock().expect("gate").running);
    }

    #[tokio::test]
    async fn a_failed_background_refresh_keeps_the_map_and_reopens_the_gate() {
        let cfg = ClientConfig {
            request_deadline: Duration::from_millis(100),
            rpc_timeout: Duration::from_millis(50),
            connect_timeout: Duration::from_millis(50),
            min_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(10),
        };
        let admin = AdminClient::new(vec!["127.0.0.1:1".into()], cfg).expect("admin");
        let p = MapPlacement::from_map(admin, sample_map());
        p.stale(ShardId(10));
        assert!(p.gate.lock().expect("gate").running, "a refresh started");
        p.stale(ShardId(11));
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!p.gate.lock().expect("gate").running, "the failed refresh finished");
        assert_eq!(*p.map(), sample_map());
    }
}
