//! Tabula's one interface to the credit contract (`contracts/src/TabulaCredit.sol`).
//!
//! This crate owns the contract's bindings (generated at compile time from the committed solc
//! artifact `contracts/out/TabulaCredit.json`, bytecode included) and the two backends that run
//! that same bytecode: an in-process EVM (revm) whose state persists in one file
//! ([`EmbeddedChain`]), and any EVM chain reached over JSON-RPC (alloy, [`RpcChain`]). Callers
//! see one [`Chain`] type; reverts come back as [`ChainError::Reverted`] with the contract's
//! custom error decoded into a sentence. It must not depend on the coordinator, on databases or
//! on models: the coordinator depends on it, never the other way round, and everything it needs
//! (a state file, an RPC URL, a key) is handed in by the caller.

#[cfg(feature = "anvil")]
pub mod anvil;
mod embedded;
pub mod merkle;
mod rpc;

use std::path::{Path, PathBuf};

pub use alloy_primitives::{Address, B256, U256};
pub use embedded::EmbeddedChain;
pub use rpc::RpcChain;

/// The contract's bindings, generated from the committed solc artifact (ABI and bytecode).
mod bindings {
    alloy::sol!(
        #[sol(rpc)]
        #[derive(Debug)]
        TabulaCredit,
        "../../contracts/out/TabulaCredit.json"
    );
}

use bindings::TabulaCredit::TabulaCreditErrors;

/// A mined (or, for the embedded EVM, executed and persisted) transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxOutcome {
    /// The transaction hash. For the embedded EVM, which signs nothing, it is
    /// `keccak256(block number as 8 big-endian bytes ‖ caller ‖ calldata)`.
    pub tx_hash: B256,
    /// Gas used as a receipt reports it: intrinsic gas included, refunds deducted.
    pub gas_used: u64,
}

/// Everything that can go wrong talking to the contract.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The contract refused the call; `reason` is its custom error as a sentence, e.g.
    /// "InvalidProof: the proof does not lead to the latest root".
    #[error("the credit contract reverted: {reason}")]
    Reverted { reason: String },
    /// Reading or writing a file (state, lock or deployment file) failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The embedded EVM's state file exists but cannot be used.
    #[error("embedded EVM state {path}: {message}")]
    State { path: PathBuf, message: String },
    /// The embedded EVM refused to execute a transaction (not a revert: an invalid transaction).
    #[error("embedded EVM: {0}")]
    Evm(String),
    /// The deployment file cannot be used with this chain.
    #[error("deployment file {path}: {message}")]
    Deployment { path: PathBuf, message: String },
    /// The signer key is not a valid secp256k1 secret key.
    #[error("invalid secp256k1 secret key: {0}")]
    InvalidKey(String),
    /// The RPC URL cannot be parsed.
    #[error("invalid RPC URL {url:?}: {message}")]
    InvalidUrl { url: String, message: String },
    /// The JSON-RPC node failed or could not be reached.
    #[error("JSON-RPC {action}: {message}")]
    Rpc {
        action: &'static str,
        message: String,
    },
}

impl ChainError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ChainError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The contract, on one of the two backends. Its async methods need a tokio runtime (the
/// embedded EVM does its file locking and I/O on tokio's blocking pool).
#[derive(Debug)]
pub enum Chain {
    /// The in-process EVM with its state in a file.
    Embedded(EmbeddedChain),
    /// A contract on an EVM chain reached over JSON-RPC.
    Rpc(RpcChain),
}

impl Chain {
    /// The in-process EVM; its state lives in `state_file` (created on first use, with the
    /// contract deployed from `owner`'s address). Survives restarts. Several processes may open
    /// the same file: each operation takes an exclusive lock (on `<state_file>.lock`), loads the
    /// state, runs, writes it atomically (temporary file + rename) and unlocks.
    pub fn embedded(state_file: &Path, owner: Address) -> Result<Chain, ChainError> {
        EmbeddedChain::open(state_file, owner).map(Chain::Embedded)
    }

    /// Any EVM chain: signs with `signer_key` (a 32-byte secp256k1 secret key); uses `contract`
    /// if given, else deploys the contract once and remembers its address in
    /// `deployment_file` (JSON `{chain_id, contract, deployed_by}`). A deployment file whose
    /// chain id differs from the node's, or whose address holds no code, is refused.
    pub async fn rpc(
        url: &str,
        signer_key: &[u8; 32],
        contract: Option<Address>,
        deployment_file: &Path,
    ) -> Result<Chain, ChainError> {
        RpcChain::connect(url, signer_key, contract, deployment_file)
            .await
            .map(Chain::Rpc)
    }

    /// The contract's address.
    pub fn contract_address(&self) -> Address {
        match self {
            Chain::Embedded(c) => c.contract_address(),
            Chain::Rpc(c) => c.contract_address(),
        }
    }

    /// A line for logs, e.g. "embedded EVM (state in /var/tabula/chain.json)" or
    /// "chain 31337 at http://127.0.0.1:8545".
    pub fn describe(&self) -> String {
        match self {
            Chain::Embedded(c) => c.describe(),
            Chain::Rpc(c) => c.describe(),
        }
    }

    /// The last posted epoch (0 before the first).
    pub async fn latest_epoch(&self) -> Result<u64, ChainError> {
        match self {
            Chain::Embedded(c) => c.clone().blocking(|c| c.latest_epoch()).await,
            Chain::Rpc(c) => c.latest_epoch().await,
        }
    }

    /// The root posted for `epoch`, or zero when it was not posted.
    pub async fn epoch_root(&self, epoch: u64) -> Result<B256, ChainError> {
        match self {
            Chain::Embedded(c) => c.clone().blocking(move |c| c.epoch_root(epoch)).await,
            Chain::Rpc(c) => c.epoch_root(epoch).await,
        }
    }

    /// Posts the root of `epoch` (which must be `latest_epoch() + 1`), as the owner.
    pub async fn post_epoch(
        &self,
        epoch: u64,
        root: B256,
        total_credit: U256,
        contributors: u64,
    ) -> Result<TxOutcome, ChainError> {
        match self {
            Chain::Embedded(c) => {
                c.clone()
                    .blocking(move |c| c.post_epoch(epoch, root, total_credit, contributors))
                    .await
            }
            Chain::Rpc(c) => c.post_epoch(epoch, root, total_credit, contributors).await,
        }
    }

    /// Claims for `account` with a proof of `(account, cumulative)` against the latest root;
    /// the contract mints the difference to what `account` claimed before. Sent by our signer
    /// (the owner for the embedded EVM): claims are relayed, the tokens go to `account`.
    pub async fn claim(
        &self,
        account: Address,
        cumulative: U256,
        proof: &[B256],
    ) -> Result<TxOutcome, ChainError> {
        match self {
            Chain::Embedded(c) => {
                let proof = proof.to_vec();
                c.clone()
                    .blocking(move |c| c.claim(account, cumulative, &proof))
                    .await
            }
            Chain::Rpc(c) => c.claim(account, cumulative, proof).await,
        }
    }

    /// The cumulative amount `account` has claimed so far.
    pub async fn claimed(&self, account: Address) -> Result<U256, ChainError> {
        match self {
            Chain::Embedded(c) => c.clone().blocking(move |c| c.claimed(account)).await,
            Chain::Rpc(c) => c.claimed(account).await,
        }
    }

    /// The token balance of `account` (micro-credits).
    pub async fn balance_of(&self, account: Address) -> Result<U256, ChainError> {
        match self {
            Chain::Embedded(c) => c.clone().blocking(move |c| c.balance_of(account)).await,
            Chain::Rpc(c) => c.balance_of(account).await,
        }
    }
}

/// An EVM address as people write it: `0x` and 40 hex digits, in any case (no checksum is
/// required). `None` for anything else, including an address without its `0x`.
pub fn parse_address(text: &str) -> Option<Address> {
    let digits = text.strip_prefix("0x")?;
    if digits.len() != 40 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    text.parse().ok()
}

/// The address of the account whose secp256k1 secret key is `key`.
pub fn address_of_key(key: &[u8; 32]) -> Result<Address, ChainError> {
    rpc::signer(key).map(|s| s.address())
}

/// Turns revert data into a sentence: the contract's custom errors by name with their meaning,
/// then Solidity's `Error(string)` and `Panic(uint256)`, then the raw bytes. The match is
/// exhaustive on purpose: an error added to the contract fails the build until it has a sentence.
pub(crate) fn revert_reason(data: &[u8]) -> String {
    use TabulaCreditErrors as E;
    use alloy::sol_types::SolInterface;
    if data.is_empty() {
        return "reverted without a reason".to_string();
    }
    match E::abi_decode(data) {
        Ok(E::EpochOutOfOrder(e)) => format!(
            "EpochOutOfOrder: epoch {} was given but the next epoch is {}",
            e.given, e.expected
        ),
        Ok(E::EmptyRoot(_)) => "EmptyRoot: the zero root cannot be posted".to_string(),
        Ok(E::NoEpochYet(_)) => {
            "NoEpochYet: no epoch has been posted, so there is nothing to claim against".to_string()
        }
        Ok(E::InvalidProof(_)) => {
            "InvalidProof: the proof does not lead to the latest root".to_string()
        }
        Ok(E::NothingToClaim(e)) => format!(
            "NothingToClaim: the cumulative amount {} is not above the {} already claimed",
            e.cumulativeAmount, e.alreadyClaimed
        ),
        Ok(E::RenounceDisabled(_)) => {
            "RenounceDisabled: ownership cannot be renounced, only transferred".to_string()
        }
        Ok(E::OwnableUnauthorizedAccount(e)) => format!(
            "OwnableUnauthorizedAccount: {} is not the contract's owner",
            e.account
        ),
        Ok(E::OwnableInvalidOwner(e)) => {
            format!("OwnableInvalidOwner: {} cannot be the owner", e.owner)
        }
        Ok(E::ERC20InsufficientBalance(e)) => format!(
            "ERC20InsufficientBalance: {} holds {} but {} are needed",
            e.sender, e.balance, e.needed
        ),
        Ok(E::ERC20InsufficientAllowance(e)) => format!(
            "ERC20InsufficientAllowance: {} may spend {} but {} are needed",
            e.spender, e.allowance, e.needed
        ),
        Ok(E::ERC20InvalidApprover(e)) => {
            format!("ERC20InvalidApprover: {} cannot approve", e.approver)
        }
        Ok(E::ERC20InvalidReceiver(e)) => {
            format!("ERC20InvalidReceiver: {} cannot receive tokens", e.receiver)
        }
        Ok(E::ERC20InvalidSender(e)) => {
            format!("ERC20InvalidSender: {} cannot send tokens", e.sender)
        }
        Ok(E::ERC20InvalidSpender(e)) => {
            format!("ERC20InvalidSpender: {} cannot be a spender", e.spender)
        }
        // Not `decode_revert_reason`: it also takes any UTF-8 bytes for a message.
        Err(_) => match alloy::sol_types::GenericContractError::abi_decode(data) {
            Ok(generic) => generic.to_string(),
            Err(_) => format!(
                "unrecognised revert data {}",
                alloy::hex::encode_prefixed(data)
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::sol_types::SolError;
    use bindings::TabulaCredit;

    #[test]
    fn custom_errors_become_sentences() {
        let data = TabulaCredit::EpochOutOfOrder {
            expected: 2,
            given: 1,
        }
        .abi_encode();
        assert_eq!(
            revert_reason(&data),
            "EpochOutOfOrder: epoch 1 was given but the next epoch is 2"
        );
        let data = TabulaCredit::InvalidProof {}.abi_encode();
        assert_eq!(
            revert_reason(&data),
            "InvalidProof: the proof does not lead to the latest root"
        );
        assert_eq!(revert_reason(&[]), "reverted without a reason");
        let data = alloy::sol_types::Revert::from("no").abi_encode();
        assert_eq!(revert_reason(&data), "revert: no");
        assert_eq!(
            revert_reason(&[1, 2, 3, 4]),
            "unrecognised revert data 0x01020304"
        );
    }

    #[test]
    fn addresses_need_0x_and_forty_hex_digits() {
        let text = "0x00000000000000000000000000000000000A11cE";
        assert_eq!(
            parse_address(text),
            Some(Address::from_slice(
                &alloy::hex::decode("00000000000000000000000000000000000a11ce").unwrap()
            ))
        );
        for bad in [
            "00000000000000000000000000000000000a11ce",
            "0x0000000000000000000000000000000000a11ce",
            "0x00000000000000000000000000000000000a11ceff",
            "0x00000000000000000000000000000000000a11cg",
            "0x",
            "",
        ] {
            assert_eq!(parse_address(bad), None, "{bad}");
        }
    }

    #[test]
    fn address_of_the_first_anvil_key() {
        let key: B256 = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
            .parse()
            .unwrap();
        assert_eq!(
            address_of_key(&key.0).unwrap(),
            "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
                .parse::<Address>()
                .unwrap()
        );
        assert!(matches!(
            address_of_key(&[0; 32]),
            Err(ChainError::InvalidKey(_))
        ));
    }
}
