//! End-to-end suites live in tests/; see tests/README.md.
