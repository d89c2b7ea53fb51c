#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    weir_proxy::fuzzing::check_jwt(data);
    weir_proxy::fuzzing::check_jwks(data);
});
