//! Which pieces of work a shell handed out are still held.
//!
//! A shell whose core counts work running outside the actor (a fetch slot,
//! a fetch being served, a verification job) learns that the work ended
//! from a message. If that message is lost (its handler panicked), the
//! core's count would stay taken across the restart. So each holder of the
//! work also keeps a [`Token`]; at a restart the shell carries over only
//! the work whose token is still alive. A shell may also learn that work
//! ended from the tokens alone ([`Holders::ended`]), with no message.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

/// Kept by whoever holds a piece of work; dropped when the work ends,
/// however it ends.
#[derive(Clone, Debug)]
pub(crate) struct Token(#[allow(dead_code)] Arc<()>);

/// The tokens handed out, by the id of their work.
#[derive(Debug, Default)]
pub(crate) struct Holders {
    held: HashMap<u64, Weak<()>>,
}

impl Holders {
    /// A token for the work `id`. Tokens dropped since are forgotten, so
    /// the table is no larger than the work still held.
    pub(crate) fn hold(&mut self, id: u64) -> Token {
        self.held.retain(|_, t| t.strong_count() > 0);
        self.hold_keeping_ended(id)
    }

    /// A token for the work `id`, forgetting nothing: for a shell that
    /// learns of ended work from [`Holders::ended`] alone.
    pub(crate) fn hold_keeping_ended(&mut self, id: u64) -> Token {
        let token = Arc::new(());
        self.held.insert(id, Arc::downgrade(&token));
        Token(token)
    }

    /// The work whose tokens were dropped since the last call, in id
    /// order; it is forgotten.
    pub(crate) fn ended(&mut self) -> Vec<u64> {
        let mut ended: Vec<u64> = self
            .held
            .iter()
            .filter(|(_, t)| t.strong_count() == 0)
            .map(|(id, _)| *id)
            .collect();
        ended.sort_unstable();
        for id in &ended {
            self.held.remove(id);
        }
        ended
    }

    /// Whether the work `id` is still held.
    pub(crate) fn held(&self, id: u64) -> bool {
        self.held.get(&id).is_some_and(|t| t.strong_count() > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_is_held_while_its_token_lives() {
        let mut holders = Holders::default();
        let a = holders.hold(1);
        let b = holders.hold(2);
        assert!(holders.held(1) && holders.held(2) && !holders.held(3));
        drop(a);
        assert!(!holders.held(1) && holders.held(2));
        let _c = holders.hold(3);
        assert_eq!(holders.held.len(), 2, "the dropped token was forgotten");
        drop(b);
        assert!(!holders.held(2));
    }

    #[test]
    fn ended_work_is_reported_once_in_id_order() {
        let mut holders = Holders::default();
        let tokens: Vec<Token> = (0..5).map(|id| holders.hold_keeping_ended(id)).collect();
        assert_eq!(holders.ended(), Vec::<u64>::new());
        let mut tokens = tokens.into_iter().map(Some).collect::<Vec<_>>();
        for id in [3, 0, 4] {
            tokens[id] = None;
        }
        // Held elsewhere too: not ended while any holder keeps it.
        let copy = tokens[1].clone();
        tokens[1] = None;
        let _five = holders.hold_keeping_ended(5);
        assert_eq!(holders.ended(), vec![0, 3, 4]);
        assert_eq!(holders.ended(), Vec::<u64>::new(), "reported once");
        drop(copy);
        assert_eq!(holders.ended(), vec![1]);
        assert!(holders.held(2) && holders.held(5));
    }
}
