//! `bd3lm check-reference` against the shipped fixture of the authors' PyTorch code.

use std::collections::HashMap;
use std::path::Path;

use safetensors::SafeTensors;
use safetensors::tensor::TensorView;

use crate::{bd3lm, data_dir};

fn fixture_dir() -> std::path::PathBuf {
    data_dir().join("reference-bd3lm-bs4")
}

fn check(fixtures: &Path) -> (i32, serde_json::Value, String) {
    let ckpt = fixture_dir();
    let out = bd3lm(&[
        "check-reference",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--fixtures",
        fixtures.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let json = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
    (
        out.status.code().unwrap_or(-1),
        json,
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Writes a fixture file holding `keep` keys of the shipped one, with `edit` applied to
/// the f32 bytes of each.
fn derived_fixture(
    dir: &Path,
    keep: &[&str],
    edit: impl Fn(&str, &mut Vec<u8>),
) -> std::path::PathBuf {
    let bytes = std::fs::read(fixture_dir().join("fixtures.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut data: HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> = HashMap::new();
    for name in keep {
        let view = st.tensor(name).unwrap();
        let mut raw = view.data().to_vec();
        edit(name, &mut raw);
        data.insert(name.to_string(), (view.dtype(), view.shape().to_vec(), raw));
    }
    let views: HashMap<String, TensorView> = data
        .iter()
        .map(|(k, (dt, shape, raw))| (k.clone(), TensorView::new(*dt, shape.clone(), raw).unwrap()))
        .collect();
    let path = dir.join("derived.safetensors");
    safetensors::serialize_to_file(&views, None, &path).unwrap();
    path
}

#[test]
fn every_key_of_the_shipped_fixture_passes_at_1e_4() {
    let (code, report, stderr) = check(&fixture_dir().join("fixtures.safetensors"));
    assert_eq!(code, 0, "{stderr}\n{report}");
    let keys = report["keys"].as_object().unwrap();
    assert_eq!(keys.len(), 15, "{report}");
    for (key, r) in keys {
        let diff = r["max_abs_diff"].as_f64().unwrap();
        assert!(diff <= 1e-4 && r["pass"] == true, "{key}: {diff}");
    }
    assert!(report["skipped"].as_object().unwrap().is_empty());
}

#[test]
fn absent_keys_are_skipped_and_a_wrong_value_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = derived_fixture(
        dir.path(),
        &["x0", "xt", "train_input", "train_logits"],
        |_, _| {},
    );
    let (code, report, _) = check(&path);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["keys"].as_object().unwrap().len(), 1);
    assert!(
        report["skipped"]["cached_logits"]
            .as_str()
            .unwrap()
            .contains("absent")
    );

    let path = derived_fixture(dir.path(), &["train_input", "train_logits"], |name, raw| {
        if name == "train_logits" {
            let v = f32::from_le_bytes(raw[..4].try_into().unwrap()) + 0.01;
            raw[..4].copy_from_slice(&v.to_le_bytes());
        }
    });
    let (code, report, _) = check(&path);
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["keys"]["train_logits"]["pass"], false);
    assert_eq!(report["pass"], false);
}

#[test]
fn bad_input_is_one_line_and_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = fixture_dir().join("fixtures.safetensors");
    let not_safetensors = dir.path().join("junk.safetensors");
    std::fs::write(&not_safetensors, b"junk").unwrap();
    let ckpt = fixture_dir();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "check-reference",
                "--checkpoint",
                dir.path().to_str().unwrap(),
                "--fixtures",
                fixtures.to_str().unwrap(),
            ],
            "config.json",
        ),
        (
            vec![
                "check-reference",
                "--checkpoint",
                ckpt.to_str().unwrap(),
                "--fixtures",
                not_safetensors.to_str().unwrap(),
            ],
            "junk.safetensors",
        ),
        (
            vec![
                "check-reference",
                "--checkpoint",
                ckpt.to_str().unwrap(),
                "--fixtures",
                fixtures.to_str().unwrap(),
                "--tolerance",
                "-1",
            ],
            "tolerance",
        ),
    ];
    for (args, needle) in cases {
        let out = bd3lm(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
