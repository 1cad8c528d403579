//! The JSON-RPC backend against a real node: anvil from `node_modules` (`npm ci` installs it),
//! the same scenario as the embedded EVM, reuse of the deployment file, and the same gas.

mod common;

use common::{first_epoch, second_epoch, temp_dir};
use tabula_chain::{Address, B256, Chain, ChainError, address_of_key, anvil::Anvil};

/// Anvil's first and second default dev keys.
const KEY: &str = tabula_chain::anvil::DEV_KEY;
const OTHER_KEY: &str = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";

fn key(hex: &str) -> [u8; 32] {
    hex.parse::<B256>().unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_on_anvil() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let anvil = Anvil::start();
    let dir = temp_dir("rpc-scenario");
    let deployment = dir.join("deployment.json");

    let chain = Chain::rpc(&anvil.url, &key(KEY), None, &deployment)
        .await
        .unwrap();
    let contract = chain.contract_address();
    assert_eq!(chain.describe(), format!("chain 31337 at {}", anvil.url));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&deployment).unwrap()).unwrap();
    assert_eq!(json["chain_id"], 31337);
    assert_eq!(
        json["contract"]
            .as_str()
            .unwrap()
            .parse::<Address>()
            .unwrap(),
        contract
    );
    assert_eq!(
        json["deployed_by"]
            .as_str()
            .unwrap()
            .parse::<Address>()
            .unwrap(),
        address_of_key(&key(KEY)).unwrap()
    );
    let rpc_gas = first_epoch(&chain).await;
    drop(chain);

    // Reopening with the deployment file reuses the contract (no new deployment: the nonce of
    // the deployer would have moved the next contract elsewhere).
    let chain = Chain::rpc(&anvil.url, &key(KEY), None, &deployment)
        .await
        .unwrap();
    assert_eq!(chain.contract_address(), contract);
    second_epoch(&chain).await;

    // Someone else may claim (relay) but not post.
    let other = Chain::rpc(
        &anvil.url,
        &key(OTHER_KEY),
        Some(contract),
        &dir.join("unused.json"),
    )
    .await
    .unwrap();
    assert_eq!(other.latest_epoch().await.unwrap(), 2);
    let r = common::reason(
        other
            .post_epoch(3, B256::repeat_byte(1), Default::default(), 1)
            .await,
    );
    assert_eq!(
        r,
        format!(
            "OwnableUnauthorizedAccount: {} is not the contract's owner",
            address_of_key(&key(OTHER_KEY)).unwrap()
        )
    );
    assert!(!dir.join("unused.json").exists());

    // A deployment file of another chain is refused.
    std::fs::write(
        &deployment,
        format!(r#"{{"chain_id": 1, "contract": "{contract}", "deployed_by": "{contract}"}}"#),
    )
    .unwrap();
    match Chain::rpc(&anvil.url, &key(KEY), None, &deployment).await {
        Err(ChainError::Deployment { message, .. }) => {
            assert!(message.contains("chain 1"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // Gas as a receipt reports it: the embedded EVM, same bytecode and hardfork, agrees.
    let embedded = Chain::embedded(
        &dir.join("embedded.json"),
        address_of_key(&key(KEY)).unwrap(),
    )
    .unwrap();
    let embedded_gas = first_epoch(&embedded).await;
    assert_eq!(embedded_gas, rpc_gas);
    drop(anvil);
    std::fs::remove_dir_all(dir).unwrap();
}
