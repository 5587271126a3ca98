//! Every fuzz target runs a few seconds from a fixed seed, corpus first: the harness cannot
//! rot, and what an earlier campaign found stays found (findings become corpus entries).

use std::time::Duration;

use bmfleet_tests::fuzz;

#[test]
fn every_parser_survives_its_corpus_and_a_short_campaign() {
    let findings = tempfile::tempdir().unwrap();
    let mut ran = Vec::new();
    for target in fuzz::targets() {
        let corpus = fuzz::corpus(&fuzz::corpus_dir(), target.name);
        assert!(!corpus.is_empty(), "{}: no corpus", target.name);
        let report = fuzz::campaign(
            &target,
            &corpus,
            Duration::from_secs(2),
            20261129,
            findings.path(),
        );
        assert!(report.finding.is_none(), "{report:?}");
        assert!(report.executions > report.corpus as u64, "{report:?}");
        ran.push(target.name);
    }
    assert_eq!(ran.len(), 11, "{ran:?}");

    // The harness itself finds what it should: a target that panics on one byte the
    // dictionary offers is caught, and the input kept.
    let fragile = fuzz::Target {
        name: "fragile",
        dictionary: &["!"],
        run: |input| assert!(!input.contains(&b'!'), "found it"),
    };
    let report = fuzz::campaign(
        &fragile,
        &[b"abc".to_vec()],
        Duration::from_secs(10),
        1,
        findings.path(),
    );
    let finding = report.finding.expect("the panic is found");
    assert!(finding.what.contains("found it"), "{finding:?}");
    assert!(std::fs::read(&finding.input).unwrap().contains(&b'!'));
}
