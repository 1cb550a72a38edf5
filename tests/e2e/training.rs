//! The training path from the command line: tokenizer, data preparation, training with a
//! resume, evaluation, generation from the result, and the bundled demo model.

use std::path::Path;

use crate::bd3lm;

fn ok(args: &[&str]) -> String {
    let out = bd3lm(args);
    assert!(
        out.status.success(),
        "bd3lm {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn fails_with(args: &[&str], needle: &str) {
    let out = bd3lm(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "bd3lm {args:?}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "{needle:?} not in {err}");
}

/// A small corpus of a few repetitive "documents".
fn corpus(dir: &Path) {
    let text = dir.join("text");
    std::fs::create_dir_all(&text).unwrap();
    let sentences = [
        "The committee met on Monday and approved the budget for the coming year.",
        "Our nation has grown stronger, and the people have chosen peace over war.",
        "We must build roads, schools and ports, and keep our promises to veterans.",
        "Trade with our neighbours increased while the debt of the government fell.",
    ];
    for i in 0..10 {
        let doc: String = (0..30)
            .map(|j| sentences[(i + j) % sentences.len()])
            .collect::<Vec<_>>()
            .join(" ");
        std::fs::write(text.join(format!("{i:02}.txt")), doc).unwrap();
    }
}

#[test]
fn tokenizer_data_train_resume_eval_and_generate() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    corpus(root);
    let p = |name: &str| root.join(name).to_str().unwrap().to_string();
    ok(&[
        "train-tokenizer",
        &p("text"),
        "--vocab-size",
        "400",
        "--out",
        &p("tok.json"),
    ]);
    ok(&[
        "prepare-data",
        &p("text"),
        "--tokenizer",
        &p("tok.json"),
        "--out",
        &p("shards"),
        "--model-length",
        "32",
        "--val-every",
        "5",
    ]);
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("shards/index.json")).unwrap())
            .unwrap();
    assert_eq!(index["validation"]["documents"], 2);
    assert_eq!(index["vocab_size"], 401);
    let shape = [
        "--hidden-dim",
        "32",
        "--n-heads",
        "2",
        "--n-blocks",
        "2",
        "--cond-dim",
        "16",
        "--batch-size",
        "4",
        "--warmup",
        "5",
        "--lr",
        "3e-3",
        "--val-every",
        "4",
        "--val-batches",
        "2",
        "--save-every",
        "4",
    ];
    let (shards, run) = (p("shards"), p("run"));
    let mut train = vec!["train", "--data", &shards, "--out", &run, "--steps", "4"];
    train.extend(shape);
    ok(&train);
    fails_with(&train, "--resume");
    ok(&["train", "--out", &p("run"), "--resume", "--steps", "8"]);
    let log = std::fs::read_to_string(root.join("run/metrics.jsonl")).unwrap();
    let steps: Vec<u64> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>());
    let ckpt = p("run/checkpoint");
    let report: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        "--checkpoint",
        &ckpt,
        "--data",
        &p("shards"),
        "--batches",
        "2",
        "--variance-batches",
        "2",
    ]))
    .unwrap();
    let ppl = report["bound"]["ppl"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0 && ppl < 401.0, "{report}");
    assert_eq!(report["model"]["trained_steps"], 8, "{report}");
    let variance = report["objective_variance"][0]["variance"]
        .as_f64()
        .unwrap();
    assert!(variance.is_finite() && variance >= 0.0, "{report}");
    // The pictures of the study, from this report and this run.
    std::fs::write(root.join("report.json"), report.to_string()).unwrap();
    for (plot, out) in [("block-sizes", "b.svg"), ("variance", "v.png")] {
        let table = ok(&["plot", plot, &p("report.json"), "--out", &p(out)]);
        assert!(table.contains(&format!("{ppl:.1}")), "{table}");
    }
    ok(&["plot", "curve", &p("run"), "--out", &p("curve.svg")]);
    let svg = std::fs::read_to_string(root.join("curve.svg")).unwrap();
    assert!(svg.contains("run training loss"), "{svg:.300}");
    let text = ok(&[
        "generate",
        "--checkpoint",
        &ckpt,
        "--prompt",
        "The committee",
        "--max-tokens",
        "16",
    ]);
    assert!(!text.trim().is_empty(), "{text:?}");
}

#[test]
fn training_inputs_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let absent = dir.path().join("absent");
    let absent = absent.to_str().unwrap();
    // Each error names the file it could not read and why.
    let not_found = |file: &str| format!("{absent}{file}: No such file or directory");
    fails_with(
        &["train", "--data", absent, "--out", absent],
        &not_found("/index.json"),
    );
    fails_with(
        &["train", "--out", absent, "--resume"],
        &not_found("/resume/state.json"),
    );
    fails_with(
        &[
            "prepare-data",
            absent,
            "--tokenizer",
            absent,
            "--out",
            absent,
        ],
        &not_found(""),
    );
    fails_with(
        &["train-tokenizer", absent, "--out", absent],
        &not_found(""),
    );
    fails_with(&["eval", "--checkpoint", absent], "nothing to evaluate");
    fails_with(
        &[
            "eval",
            "--judge",
            absent,
            "--sampler",
            "ddpm",
            "--threshold",
            "0.5",
        ],
        "only the confidence sampler takes one",
    );
    fails_with(
        &["plot", "samplers", absent, "--out", absent],
        &not_found(""),
    );
}

/// Without --checkpoint, generation uses the bundled demo model and its tokenizer.
#[test]
fn the_demo_model_is_the_default() {
    let text = ok(&[
        "generate",
        "--prompt",
        "Fellow citizens",
        "--max-tokens",
        "24",
        "--seed",
        "3",
    ]);
    assert!(text.trim().len() > 20, "{text:?}");
}
