//! `bd3lm generate` run locally on the fixture checkpoint (a random BD3-LM, vocab 1024).

use crate::{bd3lm, data_dir};

fn checkpoint() -> String {
    data_dir()
        .join("reference-bd3lm-bs4")
        .to_str()
        .unwrap()
        .to_string()
}

fn generate(extra: &[&str]) -> (i32, String, String) {
    let ckpt = checkpoint();
    let mut args = vec!["generate", "--checkpoint", ckpt.as_str()];
    args.extend_from_slice(extra);
    let out = bd3lm(&args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn generates_the_requested_tokens_reproducibly() {
    for sampler in ["ddpm", "first-hitting", "confidence"] {
        let args = [
            "--prompt-ids",
            "1022,5,6",
            "--max-tokens",
            "30",
            "--seed",
            "7",
            "--sampler",
            sampler,
        ];
        let (code, stdout, stderr) = generate(&args);
        assert_eq!(code, 0, "{stderr}");
        let ids: Vec<u32> = stdout
            .split_whitespace()
            .map(|t| t.parse().unwrap())
            .collect();
        assert_eq!(ids.len(), 30, "{stdout}");
        assert!(ids.iter().all(|&i| i < 1023), "never the mask id");
        assert!(
            stderr.contains("tokens 30")
                && stderr.contains("stop max_tokens")
                && stderr.contains("seed 7"),
            "{stderr}"
        );
        assert_eq!(generate(&args).1, stdout, "same seed, same tokens");
    }
}

/// A word-level tokenizer over the fixture's 1024 ids ("w0" .. "w1023").
fn word_tokenizer(dir: &std::path::Path) -> std::path::PathBuf {
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..1024).map(|i| (format!("w{i}"), i.into())).collect();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
    });
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, json.to_string()).unwrap();
    path
}

#[test]
fn text_prompts_go_through_the_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let tok = word_tokenizer(dir.path());
    let (code, stdout, stderr) = generate(&[
        "--tokenizer",
        tok.to_str().unwrap(),
        "--prompt",
        "w5 w6",
        "--max-tokens",
        "12",
        "--greedy",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let words: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(words.len(), 12, "{stdout}");
    assert!(words.iter().all(|w| w.starts_with('w')), "{stdout}");
}

#[test]
fn invalid_parameters_are_one_line_and_exit_code_2() {
    let cases: [(&[&str], &str); 8] = [
        (&["--top-p", "0"], "top_p"),
        (&["--top-p", "1.5"], "top_p"),
        (&["--steps", "0"], "steps"),
        (&["--temperature", "-1"], "temperature"),
        (&["--max-tokens", "0"], "max_tokens"),
        (&["--prompt-ids", "1023"], "prompt"),
        (&["--prompt", "hello"], "tokenizer"),
        (&["--sampler", "beam"], "sampler"),
    ];
    for (args, needle) in cases {
        let (code, _, stderr) = generate(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    let out = bd3lm(&["generate", "--checkpoint", "/nonexistent/checkpoint"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("config.json"));
}

#[test]
fn stop_sequences_truncate_the_output() {
    let args = ["--prompt-ids", "1022", "--max-tokens", "24", "--seed", "3"];
    let (_, stdout, _) = generate(&args);
    let ids: Vec<&str> = stdout.split_whitespace().collect();
    let stop = ids[10];
    let first = ids.iter().position(|&t| t == stop).unwrap();
    let mut with_stop = args.to_vec();
    with_stop.extend_from_slice(&["--stop-ids", stop]);
    let (code, stdout, stderr) = generate(&with_stop);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stdout.split_whitespace().collect::<Vec<_>>(),
        ids[..first].to_vec()
    );
    assert!(stderr.contains("stop stop_sequence"), "{stderr}");
}
