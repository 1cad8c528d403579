//! A local `anvil` node for tests (feature `anvil`): npm `@foundry-rs/anvil` from the
//! repository's `node_modules`, on a free port, stopped with its whole process group.

use std::{
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

/// The first of anvil's default development keys (its account is funded).
pub const DEV_KEY: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";

/// A running anvil, stopped (with the npm wrapper's whole process group) when dropped.
pub struct Anvil {
    child: Child,
    /// Its JSON-RPC endpoint, e.g. `http://127.0.0.1:41234`.
    pub url: String,
}

impl Anvil {
    /// Starts anvil from the repository's `node_modules` (panics, saying to run `npm ci`,
    /// when it is missing).
    pub fn start() -> Anvil {
        // Every crate of the workspace is two levels down; cargo's variable at run time names
        // the checkout being tested even when the binary was built in another one.
        let bin = std::env::var_os("CARGO_MANIFEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
            .join("../../node_modules/.bin/anvil");
        assert!(
            bin.exists(),
            "{} is missing: run `npm ci` in the repository root",
            bin.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            // Pinned so that gas is comparable with the embedded EVM's (revm's default, Osaka).
            .args(["--hardfork", "osaka"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Its own process group: the npm wrapper is node, which runs the real binary.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} ({e}): run `npm ci`", bin.display()));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        // Reads anvil's output until it listens, then keeps draining it so it never blocks.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("Listening on") {
                    let _ = tx.send(());
                }
            }
        });
        let mut anvil = Anvil {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let status = anvil.child.try_wait();
            panic!("anvil did not start listening on port {port} ({status:?}): run `npm ci`");
        }
        anvil
    }
}

impl Drop for Anvil {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }
}
