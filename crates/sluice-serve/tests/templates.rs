//! Each published template in tests/fixtures/templates, rendered by sluice
//! for plain, multi-turn and tool-calling conversations, equals what
//! transformers' jinja2 setup renders (scripts/render_templates.py wrote
//! the expected strings).

use serde_json::{Map, Value};
use sluice_serve::{ChatTemplate, Family};
use std::path::Path;

fn dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/templates")
}

/// Puts the fixed date the expected strings were made with in place of
/// today's (gpt-oss writes `Current date: ...`).
fn fix_date(s: &str) -> String {
    match s.find("Current date: ") {
        Some(i) => {
            let j = i + "Current date: ".len();
            format!("{}2026-01-01{}", &s[..j], &s[j + 10..])
        }
        None => s.to_string(),
    }
}

#[test]
fn published_templates_render_as_transformers_renders_them() {
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(dir().join("expected.json")).unwrap())
            .unwrap();
    assert!(cases.len() >= 18);
    let mut families = std::collections::BTreeSet::new();
    for c in &cases {
        let name = c["template"].as_str().unwrap();
        let src = std::fs::read_to_string(dir().join(name)).unwrap();
        let t = ChatTemplate::new(
            &src,
            c["bos"].as_str().unwrap(),
            c["eos"].as_str().unwrap(),
            name,
        )
        .unwrap();
        families.insert(format!("{:?}", t.family()));
        let msgs = c["messages"].as_array().unwrap();
        let tools = c["tools"].as_array().map(|v| v.as_slice());
        let got = t.render(msgs, tools, true, &Map::new()).unwrap();
        let want = c["expected"].as_str().unwrap();
        assert_eq!(fix_date(&got), want, "{name} / {}", c["case"]);
    }
    for f in ["Hermes", "Glm", "DeepSeek", "Harmony", "XmlFunction"] {
        assert!(families.contains(f), "{f} among {families:?}");
    }
}

#[test]
fn families_are_told_apart() {
    let fam = |n: &str| {
        let src = std::fs::read_to_string(dir().join(n)).unwrap();
        ChatTemplate::new(&src, "", "", n).unwrap().family()
    };
    assert_eq!(fam("Qwen-Qwen3-0.6B.jinja"), Family::Hermes);
    assert_eq!(fam("GLM-4.6.jinja"), Family::Glm);
    assert_eq!(fam("deepseek-ai-DeepSeek-V3.1.jinja"), Family::DeepSeek);
    assert_eq!(fam("openai-gpt-oss-120b.jinja"), Family::Harmony);
    assert_eq!(fam("Qwen3.5-4B.jinja"), Family::XmlFunction);
}
