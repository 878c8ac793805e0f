//! What the node is in its genesis committee, told once at start: a
//! validator (with a check that its key files and address are the ones
//! its entry names) or a full node.

use soma_types::{Committee, PeerId, PublicKey};

/// One thing to tell about the node's role, and whether it is a mistake.
#[derive(Debug, PartialEq, Eq)]
pub struct Note {
    /// A likely mistake (logged as a warning), or only information.
    pub warning: bool,
    /// What to tell, with the fix for a mistake.
    pub text: String,
}

fn info(text: String) -> Note {
    Note {
        warning: false,
        text,
    }
}

fn warning(text: String) -> Note {
    Note {
        warning: true,
        text,
    }
}

/// The notes on a node with peer id `peer` and protocol public key
/// `protocol`, advertising `advertised` (canonical addresses), in
/// `committee` (the genesis's).
pub fn notes(
    committee: &Committee,
    peer: PeerId,
    protocol: &PublicKey,
    advertised: &[String],
) -> Vec<Note> {
    let total = committee.total_stake();
    let by_network = committee.authorities().find(|(_, a)| a.network_key == peer);
    let Some((index, authority)) = by_network else {
        let by_protocol = committee
            .authorities()
            .find(|(_, a)| a.protocol_key == *protocol);
        return vec![match by_protocol {
            Some((index, a)) => warning(format!(
                "keys-dir holds the protocol key of validator {index} of the genesis ({}) but \
                 another network key: the node runs as a full node; put back that validator's \
                 network.key, tls.crt and tls.key",
                a.address
            )),
            None => info(
                "not in the genesis committee: the node runs as a full node (syncs and \
                 serves, produces nothing)"
                    .into(),
            ),
        }];
    };
    let mut notes = vec![info(format!(
        "validator {index} of the genesis committee, at {}, with stake {} of {total}",
        authority.address, authority.stake
    ))];
    if authority.protocol_key != *protocol {
        notes.push(warning(format!(
            "keys-dir holds the network key of validator {index} of the genesis but another \
             protocol key: blocks signed with it are refused by every peer; put back that \
             validator's protocol.key"
        )));
    }
    // Only an address written as peers write one can be compared: a host
    // name may resolve to any of them.
    // Nor can one listening on every address without external-addresses:
    // it is reached there, and told at load that it advertises 0.0.0.0.
    let named = soma_actors::discovery::canonical_address(&authority.address);
    let comparable = named.parse::<std::net::SocketAddr>().is_ok();
    let everywhere = (advertised.iter()).any(|a| {
        a.parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_unspecified())
    });
    if comparable && !everywhere && !advertised.contains(&named) {
        notes.push(warning(format!(
            "the genesis names validator {index} at {}, but the node advertises {}: peers \
             dialling the validator's address will not find it; set listen-address or \
             external-addresses to it",
            authority.address,
            advertised.join(", ")
        )));
    }
    notes
}

#[cfg(test)]
mod tests {
    use soma_types::{Authority, KeyPair};

    use super::*;

    fn key(n: u8) -> KeyPair {
        KeyPair::from_seed([n; 32])
    }

    /// Validators 0 and 1: network keys 10 and 11, protocol keys 20 and
    /// 21, at 10.0.0.1:7000 and `second`.
    fn committee(second: &str) -> Committee {
        let authority = |n: u8, address: &str| Authority {
            stake: u64::from(n) + 1,
            protocol_key: key(20 + n).public(),
            network_key: PeerId::from(key(10 + n).public()),
            address: address.into(),
        };
        Committee::new(0, vec![authority(0, "10.0.0.1:7000"), authority(1, second)]).unwrap()
    }

    fn texts(notes: &[Note]) -> Vec<(bool, &str)> {
        notes.iter().map(|n| (n.warning, n.text.as_str())).collect()
    }

    #[test]
    fn a_validator_with_its_own_keys_at_its_address_is_told_alone() {
        let c = committee("validator-1.example.org:7000");
        let notes = notes(
            &c,
            PeerId::from(key(10).public()),
            &key(20).public(),
            &["10.0.0.1:7000".into()],
        );
        assert_eq!(
            texts(&notes),
            [(
                false,
                "validator #0 of the genesis committee, at 10.0.0.1:7000, with stake 1 of 3"
            )]
        );
        // A host name is not compared.
        let notes = notes_of(&c, 11, 21, "10.0.0.9:7000");
        assert_eq!(notes.len(), 1, "{notes:?}");
        // Nor is a node listening on every address (warned of at load).
        let c = committee("10.0.0.2:7000");
        assert_eq!(notes_of(&c, 11, 21, "0.0.0.0:7000").len(), 1);
        assert_eq!(notes_of(&c, 11, 21, "[::]:7000").len(), 1);
    }

    fn notes_of(c: &Committee, network: u8, protocol: u8, advertised: &str) -> Vec<Note> {
        notes(
            c,
            PeerId::from(key(network).public()),
            &key(protocol).public(),
            &[advertised.into()],
        )
    }

    #[test]
    fn mismatched_key_files_and_an_address_elsewhere_are_warned_with_the_fix() {
        let c = committee("10.0.0.2:7000");
        // Validator 1's network key with validator 0's protocol key, at
        // another address than its entry's.
        let notes = notes_of(&c, 11, 20, "10.0.0.3:7000");
        let warnings: Vec<&str> = (notes.iter())
            .filter(|n| n.warning)
            .map(|n| n.text.as_str())
            .collect();
        assert_eq!(warnings.len(), 2, "{notes:?}");
        assert!(warnings[0].contains("another protocol key"), "{warnings:?}");
        assert!(warnings[0].contains("put back that validator's protocol.key"));
        assert!(
            warnings[1].contains("names validator #1 at 10.0.0.2:7000")
                && warnings[1].contains("advertises 10.0.0.3:7000"),
            "{warnings:?}"
        );
        // A validator's protocol key with another network key: a full node
        // by mistake.
        let notes = notes_of(&c, 12, 21, "10.0.0.2:7000");
        assert_eq!(notes.len(), 1);
        assert!(notes[0].warning);
        assert!(
            notes[0].text.contains("protocol key of validator #1"),
            "{notes:?}"
        );
        // Neither: a full node.
        let notes = notes_of(&c, 12, 22, "10.0.0.2:7000");
        assert!(!notes[0].warning);
        assert!(notes[0].text.starts_with("not in the genesis committee"));
    }
}
