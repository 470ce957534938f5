//! Netmap JSON for the API, with a per-version cache of serialised peers. A change makes every
//! host fetch a netmap listing every other host, so serialising is O(hosts²) per change; but a
//! peer looks the same from most hosts (it differs only in endpoint order and keepalive), so
//! each distinct `NetmapPeer` is serialised once per version and copied from then on. The
//! output is byte-for-byte what `serde_json::to_vec(&netmap)` gives (tested).

use std::collections::HashMap;
use std::sync::RwLock;

use mesh_proto::netmap::{Netmap, NetmapPeer};

use super::CoordError;

/// How many distinct variants of one peer are cached (endpoint order x keepalive).
const MAX_VARIANTS: usize = 8;

#[derive(Default)]
struct Entries {
    version: u64,
    peers: HashMap<String, Vec<(NetmapPeer, Vec<u8>)>>,
}

/// Serialised peers of one netmap version.
#[derive(Default)]
pub(crate) struct PeerJsonCache {
    inner: RwLock<Entries>,
}

fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, CoordError> {
    serde_json::to_vec(v).map_err(|e| CoordError::Internal(format!("serialising a netmap: {e}")))
}

impl PeerJsonCache {
    /// The JSON of `nm`.
    pub(crate) fn render(&self, mut nm: Netmap) -> Result<Vec<u8>, CoordError> {
        const TAIL: &[u8] = b"\"peers\":[]}";
        let peers = std::mem::take(&mut nm.peers);
        let shell = json(&nm)?;
        if !shell.ends_with(TAIL) {
            // `peers` is no longer the last field: no splicing.
            nm.peers = peers;
            return json(&nm);
        }
        let mut out = Vec::with_capacity(shell.len() + peers.len() * 384);
        out.extend_from_slice(&shell[..shell.len() - 2]);
        let mut misses: Vec<(NetmapPeer, Vec<u8>)> = Vec::new();
        {
            let guard = self.inner.read().ok();
            let cache = guard.as_ref().filter(|c| c.version == nm.version);
            for (i, p) in peers.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let hit = cache.and_then(|c| {
                    c.peers
                        .get(&p.name)
                        .and_then(|vs| vs.iter().find(|(q, _)| q == p))
                        .map(|(_, bytes)| bytes)
                });
                match hit {
                    Some(bytes) => out.extend_from_slice(bytes),
                    None => {
                        let bytes = json(p)?;
                        out.extend_from_slice(&bytes);
                        misses.push((p.clone(), bytes));
                    }
                }
            }
        }
        out.extend_from_slice(b"]}");
        if !misses.is_empty() {
            if let Ok(mut cache) = self.inner.write() {
                if nm.version > cache.version {
                    cache.version = nm.version;
                    cache.peers.clear();
                }
                if nm.version == cache.version {
                    for (peer, bytes) in misses {
                        let variants = cache.peers.entry(peer.name.clone()).or_default();
                        if variants.len() < MAX_VARIANTS
                            && !variants.iter().any(|(q, _)| *q == peer)
                        {
                            variants.push((peer, bytes));
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}
