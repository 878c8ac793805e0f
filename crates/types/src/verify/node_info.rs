use std::collections::HashSet;

use crate::{
    Domain, Error, Limits, PeerId, Result, SignedItem, SignedNodeInfo, verify::SignatureBatch,
};

/// The local facts a node info is judged against.
#[derive(Clone, Copy, Debug)]
pub struct NodeInfoPolicy<'a> {
    /// The current time, in milliseconds since the Unix epoch.
    pub now_ms: u64,
    /// Our own peer id: our own info, passed back by others, is checked as
    /// any other's (it tells whether another node holds our key), allowlist
    /// or not; it is never added as a peer (Discovery's rule).
    pub local: PeerId,
    /// In private mode, the only peers whose infos are accepted.
    pub allowlist: Option<&'a HashSet<PeerId>>,
}

/// Checks every rule of a node info except its signature: not
/// older than `limits.node_info_max_age_ms`, not more than
/// `limits.node_info_max_skew_ms` ahead, bounded addresses, allowlisted when
/// the policy has an allowlist.
pub fn check_node_info(
    info: &SignedNodeInfo,
    policy: &NodeInfoPolicy<'_>,
    limits: &Limits,
) -> Result<()> {
    let i = &info.info;
    if policy.now_ms.saturating_sub(i.timestamp_ms) > limits.node_info_max_age_ms {
        return Err(Error::NodeInfoExpired(i.peer_id));
    }
    if i.timestamp_ms.saturating_sub(policy.now_ms) > limits.node_info_max_skew_ms {
        return Err(Error::NodeInfoFromFuture(i.peer_id));
    }
    if i.addresses.len() > limits.max_node_addresses
        || i.addresses
            .iter()
            .any(|a| a.len() > limits.max_address_bytes)
    {
        return Err(Error::InvalidAddresses(i.peer_id));
    }
    if let Some(allowlist) = policy.allowlist
        && i.peer_id != policy.local
        && !allowlist.contains(&i.peer_id)
    {
        return Err(Error::NotAllowlisted(i.peer_id));
    }
    Ok(())
}

/// Verifies node infos one by one (a bad entry does not spoil the others):
/// each result says whether that info passes [`check_node_info`] and is
/// signed by the key its `peer_id` names. Signatures are batch-checked.
pub fn verify_node_infos(
    infos: &[SignedNodeInfo],
    policy: &NodeInfoPolicy<'_>,
    limits: &Limits,
) -> Vec<Result<()>> {
    let mut results: Vec<Result<()>> = Vec::with_capacity(infos.len());
    let mut batch = SignatureBatch::with_capacity(infos.len());
    let mut in_batch = Vec::with_capacity(infos.len());
    for (i, info) in infos.iter().enumerate() {
        let checked =
            check_node_info(info, policy, limits).and_then(|()| info.info.peer_id.public_key());
        match checked {
            Ok(key) => {
                batch.push(
                    &key,
                    Domain::NodeInfo,
                    &info.signing_digest(),
                    &info.signature,
                    SignedItem::NodeInfo(info.info.peer_id),
                );
                in_batch.push(i);
                results.push(Ok(()));
            }
            Err(e) => results.push(Err(e)),
        }
    }
    for (i, result) in in_batch.into_iter().zip(batch.verify_each()) {
        results[i] = result;
    }
    results
}
