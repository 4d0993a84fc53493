//! openraft's own storage conformance suite, run against the RocksDB store.

use std::sync::Arc;

use openraft::testing::{StoreBuilder, Suite};
use raft::storage::{self, LogStore, StateMachineStore};
use raft::types::{StorageError, TypeConfig};
use raft::{KvError, StateMachineLogic, Txn};

/// Stores each command under its log index and echoes it back.
struct Echo;

impl StateMachineLogic for Echo {
    fn apply(&self, txn: &mut Txn<'_>, index: u64, command: &[u8]) -> Result<Vec<u8>, KvError> {
        txn.put(index.to_be_bytes().to_vec(), command.to_vec());
        Ok(command.to_vec())
    }
}

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, sm) = storage::open(dir.path(), Arc::new(Echo)).expect("open store");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    let _ = tracing_subscriber::fmt().with_env_filter("info").with_test_writer().try_init();
    if let Err(e) = Suite::test_all(Builder) {
        panic!("openraft storage suite: {e}");
    }
}
