//! [`Cluster`] over the Admin API: the plugin's volumes are the cluster's.

use anyhow::{bail, Result};
use ballast_client::{AdminClient, ClientError};
use ballast_types::{format_size, CreateVolume, ErrorCode, FailureDomain, PoolInfo, PoolSpec};

use super::driver::{Cluster, CreateOpts, VolumeStatus};
use crate::cli::admin::DEFAULT_POOL;

/// Shards of a pool the plugin creates for a replica count (as `cluster init`'s default).
pub const NEW_POOL_SHARDS: u32 = 8;

pub struct AdminCluster {
    pub admin: AdminClient,
}

fn is_code(e: &ClientError, codes: &[ErrorCode]) -> bool {
    matches!(e, ClientError::Api(a) if codes.contains(&a.code))
}

/// The pool a new volume goes in:
/// - `pool` given: that pool, which must exist (and have `replicas` copies
///   if that is given too);
/// - only `replicas`: `default` if it has that many copies, else the first
///   pool by name that has, else `None` (create `r<N>`);
/// - neither: `default`.
pub fn choose_pool(pools: &[PoolInfo], opts: &CreateOpts) -> Result<Option<String>, String> {
    if let Some(name) = &opts.pool {
        let Some(p) = pools.iter().find(|p| &p.spec.name == name) else {
            return Err(format!("no pool {name:?} (pools: {})", names(pools)));
        };
        if let Some(r) = opts.replicas.filter(|r| *r != p.spec.replicas) {
            return Err(format!("pool {name:?} keeps {} replicas, not {r}", p.spec.replicas));
        }
        return Ok(Some(name.clone()));
    }
    let Some(r) = opts.replicas else { return Ok(Some(DEFAULT_POOL.to_string())) };
    let mut fits: Vec<&PoolInfo> = pools.iter().filter(|p| p.spec.replicas == r).collect();
    fits.sort_by_key(|p| (p.spec.name != DEFAULT_POOL, p.spec.name.clone()));
    Ok(fits.first().map(|p| p.spec.name.clone()))
}

fn names(pools: &[PoolInfo]) -> String {
    let mut n: Vec<&str> = pools.iter().map(|p| p.spec.name.as_str()).collect();
    n.sort();
    if n.is_empty() {
        "none".into()
    } else {
        n.join(", ")
    }
}

impl AdminCluster {
    async fn pool_for(&self, opts: &CreateOpts) -> Result<String> {
        let pools = self.admin.list_pools().await?;
        if let Some(p) = choose_pool(&pools, opts).map_err(anyhow::Error::msg)? {
            return Ok(p);
        }
        let replicas = opts.replicas.expect("choose_pool answers None only for a replica count");
        let spec = PoolSpec {
            name: format!("r{replicas}"),
            replicas,
            shards: NEW_POOL_SHARDS,
            failure_domain: FailureDomain::Node,
        };
        match self.admin.create_pool(&spec).await {
            Ok(_) => {
                tracing::info!(pool = %spec.name, replicas, shards = spec.shards, "created a pool for the replica count")
            }
            // Another host's plugin made it first.
            Err(e) if is_code(&e, &[ErrorCode::AlreadyExists]) => {}
            Err(e) => return Err(anyhow::Error::new(e).context(format!("creating pool {:?}", spec.name))),
        }
        Ok(spec.name)
    }
}

impl Cluster for AdminCluster {
    async fn create(&self, name: &str, opts: &CreateOpts) -> Result<()> {
        let pool = self.pool_for(opts).await?;
        let req = CreateVolume { name: name.to_owned(), size: opts.size, pool };
        match self.admin.create_volume(&req).await {
            Ok(_) => Ok(()),
            Err(e) if is_code(&e, &[ErrorCode::AlreadyExists]) => {
                // Scope global: another host may have created it; the same
                // volume again is fine, a different one is not.
                let have = self.admin.volume(name).await?;
                if have.size != opts.size {
                    bail!("a volume {name:?} of {} exists already", format_size(have.size));
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn remove(&self, name: &str) -> Result<()> {
        match self.admin.delete_volume(name).await {
            Err(e) if is_code(&e, &[ErrorCode::NoSuchVolume, ErrorCode::NotFound]) => Ok(()),
            r => Ok(r?),
        }
    }

    async fn get(&self, name: &str) -> Result<Option<VolumeStatus>> {
        let v = match self.admin.volume(name).await {
            Ok(v) => v,
            Err(e) if is_code(&e, &[ErrorCode::NoSuchVolume, ErrorCode::NotFound]) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let pools = self.admin.list_pools().await?;
        let (pool, replicas) = pools
            .iter()
            .find(|p| p.id == v.pool)
            .map_or((v.pool.to_string(), 0), |p| (p.spec.name.clone(), p.spec.replicas));
        Ok(Some(VolumeStatus { size: v.size, pool, replicas }))
    }

    async fn list(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = self.admin.list_volumes().await?.into_iter().map(|v| v.name).collect();
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_types::{PoolId, ShardId};

    fn pool(id: u32, name: &str, replicas: u32) -> PoolInfo {
        PoolInfo {
            id: PoolId(id),
            spec: PoolSpec { name: name.into(), replicas, shards: 4, failure_domain: FailureDomain::Node },
            first_shard: ShardId(id * 4),
        }
    }

    fn opts(replicas: Option<u32>, pool: Option<&str>) -> CreateOpts {
        CreateOpts { size: 1 << 30, replicas, pool: pool.map(str::to_string) }
    }

    #[test]
    fn a_replica_count_picks_default_then_a_pool_by_name_then_a_new_one() {
        let pools = [pool(1, "zeta", 3), pool(2, "default", 3), pool(3, "alpha", 3), pool(4, "solo", 1)];
        assert_eq!(choose_pool(&pools, &opts(Some(3), None)), Ok(Some("default".into())));
        assert_eq!(choose_pool(&pools[..1], &opts(None, None)), Ok(Some("default".into())));
        assert_eq!(choose_pool(&[pools[0].clone(), pools[2].clone()], &opts(Some(3), None)), Ok(Some("alpha".into())));
        assert_eq!(choose_pool(&pools, &opts(Some(1), None)), Ok(Some("solo".into())));
        assert_eq!(choose_pool(&pools, &opts(Some(5), None)), Ok(None));
        assert_eq!(choose_pool(&pools, &opts(Some(1), Some("solo"))), Ok(Some("solo".into())));
        let e = choose_pool(&pools, &opts(Some(3), Some("solo"))).unwrap_err();
        assert!(e.contains("keeps 1 replicas, not 3"), "{e}");
        let e = choose_pool(&pools, &opts(None, Some("nope"))).unwrap_err();
        assert!(e.contains("no pool \"nope\" (pools: alpha, default, solo, zeta)"), "{e}");
    }
}
