//! The harness of the test binaries that also run as their own helper
//! processes (so they cannot use the standard one): libtest-mimic over a
//! list of plain test functions. Included by path from each such binary.

/// Runs `tests` with the usual test flags and filters, and exits; with
/// `one_at_a_time`, one test at a time unless `--test-threads` says
/// otherwise (tests that start processes of their own on two cores).
pub fn run_tests(tests: Vec<(&'static str, fn())>, one_at_a_time: bool) -> ! {
    let mut args = libtest_mimic::Arguments::from_args();
    if one_at_a_time {
        args.test_threads.get_or_insert(1);
    }
    let trials = tests
        .into_iter()
        .map(|(name, f)| {
            libtest_mimic::Trial::test(name, move || {
                f();
                Ok(())
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit()
}
