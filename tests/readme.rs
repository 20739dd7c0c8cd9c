//! The agent example of the README and of docs/client.md is `client/examples/agent.rs`,
//! which the tests compile: they must not drift apart.

/// The lines of `text` between `start` and the next `end`.
fn between<'a>(text: &'a str, start: &str, end: &str) -> Vec<&'a str> {
    let from = text.find(start).expect("start marker") + start.len();
    let to = from + text[from..].find(end).expect("end marker");
    text[from..to].lines().collect()
}

#[test]
fn the_readme_agent_example_is_the_compiled_one() {
    check_against_the_example("README.md", "## An agent");
    check_against_the_example("docs/client.md", "# Client library");
}

/// The first Rust block after `heading` in the file at `path` is the agent example.
fn check_against_the_example(path: &str, heading: &str) {
    let root = env!("CARGO_MANIFEST_DIR");
    let text = std::fs::read_to_string(format!("{root}/{path}")).unwrap();
    let example = std::fs::read_to_string(format!("{root}/client/examples/agent.rs")).unwrap();
    let after = &text[text.find(heading).expect("the heading")..];
    let block = between(after, "```rust\n", "```");
    let (uses, body): (Vec<&str>, Vec<&str>) =
        block.into_iter().partition(|line| line.starts_with("use "));
    let body: Vec<&str> = body.into_iter().skip_while(|l| l.is_empty()).collect();
    let region: Vec<&str> = between(&example, "    // README: begin\n", "    // README: end")
        .into_iter()
        .map(|line| line.strip_prefix("    ").unwrap_or(line))
        .collect();
    assert_eq!(
        body, region,
        "README.md's agent example differs from client/examples/agent.rs"
    );
    // Everything the README imports, the example imports too (its `use` items joined into
    // one line each).
    let mut example_uses: Vec<String> = Vec::new();
    let mut open: Option<String> = None;
    for line in example.lines() {
        if let Some(item) = open.as_mut() {
            item.push(' ');
            item.push_str(line.trim());
        } else if line.starts_with("use ") {
            open = Some(line.to_owned());
        }
        if open.as_ref().is_some_and(|item| item.ends_with(';')) {
            example_uses.extend(open.take());
        }
    }
    for line in uses {
        let names = line
            .trim_start_matches("use ")
            .trim_end_matches(';')
            .replace(['{', '}'], " ");
        let mut parts = names.split("::");
        let krate = parts.next().unwrap();
        for name in parts
            .flat_map(|p| p.split(','))
            .map(str::trim)
            .filter(|n| !n.is_empty())
        {
            assert!(
                example_uses
                    .iter()
                    .any(|u| u.starts_with(&format!("use {krate}")) && u.contains(name)),
                "the example does not import {krate}::{name} ({path})"
            );
        }
    }
}
