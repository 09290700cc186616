//! One Kafka transaction, named as precisely as the broker lets: transactional id, producer id
//! and epoch, and the time the broker began it. A producer keeps its id and epoch across all
//! the transactions it runs (pre-KIP-890 rules, which librdkafka follows), so only the start
//! time tells one of its transactions from the next.

use crate::wire::TxnDescription;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnRef {
    pub transactional_id: String,
    pub producer_id: i64,
    pub producer_epoch: i16,
    /// `transaction_start_time_ms` as DescribeTransactions reported it at prepare.
    pub start_ms: i64,
}

/// How a transaction ended, as far as the broker can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Committed,
    Aborted,
    /// Not decided yet (still open).
    Pending,
    /// The broker no longer knows this transaction (its id moved on to other transactions).
    Unknown,
}

impl TxnRef {
    /// The vote metadata: readable in `pledge log inspect`, parsed back by [`TxnRef::from_metadata`].
    pub fn metadata(&self) -> Vec<u8> {
        format!(
            "transactional.id={} producer.id={} producer.epoch={} txn.start.ms={}",
            self.transactional_id, self.producer_id, self.producer_epoch, self.start_ms
        )
        .into_bytes()
    }

    /// The transaction named by vote metadata.
    pub fn from_metadata(metadata: &[u8]) -> Option<TxnRef> {
        let text = std::str::from_utf8(metadata).ok()?;
        let field = |name: &str| text.split_whitespace().find_map(|p| p.strip_prefix(name)?.strip_prefix('='));
        Some(TxnRef {
            transactional_id: field("transactional.id")?.to_string(),
            producer_id: field("producer.id")?.parse().ok()?,
            producer_epoch: field("producer.epoch")?.parse().ok()?,
            start_ms: field("txn.start.ms")?.parse().ok()?,
        })
    }

    /// How this transaction ended, from what DescribeTransactions says of its transactional id
    /// now (`None`: nothing).
    pub fn fate(&self, now: Option<&TxnDescription>) -> Fate {
        let Some(d) = now else { return Fate::Unknown };
        let ours = d.producer_id == self.producer_id && d.start_ms == self.start_ms;
        match d.state.as_str() {
            // Still this transaction (same producer, same start).
            _ if !ours => Fate::Unknown,
            "CompleteCommit" | "PrepareCommit" if d.producer_epoch == self.producer_epoch => Fate::Committed,
            "CompleteAbort" | "PrepareAbort" if d.producer_epoch == self.producer_epoch => Fate::Aborted,
            // The broker aborted it and fenced its producer (a transaction timeout, or another
            // producer starting on the id while it was open): that bumps the epoch by one and
            // keeps the transaction's start.
            "CompleteAbort" | "PrepareAbort" if d.producer_epoch == self.producer_epoch.wrapping_add(1) => {
                Fate::Aborted
            }
            "Ongoing" if d.producer_epoch == self.producer_epoch => Fate::Pending,
            _ => Fate::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txn() -> TxnRef {
        TxnRef { transactional_id: "pledge-orders-3".into(), producer_id: 4001, producer_epoch: 7, start_ms: 1_700 }
    }

    fn described(state: &str, epoch: i16, start_ms: i64) -> TxnDescription {
        TxnDescription { state: state.into(), producer_id: 4001, producer_epoch: epoch, partitions: vec![], start_ms }
    }

    #[test]
    fn vote_metadata_round_trips() {
        assert_eq!(TxnRef::from_metadata(&txn().metadata()), Some(txn()));
        assert_eq!(TxnRef::from_metadata(b"garbage"), None);
        assert_eq!(TxnRef::from_metadata(b"transactional.id=x producer.id=1 producer.epoch=2"), None);
    }

    #[test]
    fn a_fate_is_told_only_of_the_same_transaction() {
        let t = txn();
        assert_eq!(t.fate(Some(&described("CompleteCommit", 7, 1_700))), Fate::Committed);
        assert_eq!(t.fate(Some(&described("CompleteAbort", 7, 1_700))), Fate::Aborted);
        assert_eq!(t.fate(Some(&described("CompleteAbort", 8, 1_700))), Fate::Aborted, "aborted on timeout");
        assert_eq!(t.fate(Some(&described("Ongoing", 7, 1_700))), Fate::Pending);
        // The same producer's next transaction, or the id restarted: nothing is known of ours.
        assert_eq!(t.fate(Some(&described("CompleteCommit", 7, 1_800))), Fate::Unknown);
        assert_eq!(t.fate(Some(&described("Empty", 8, 1_700))), Fate::Unknown);
        assert_eq!(t.fate(Some(&described("CompleteCommit", 8, 1_700))), Fate::Unknown);
        assert_eq!(t.fate(None), Fate::Unknown);
    }
}
