//! `wrong-world`: a valid component that is not a persona. It exports the interface
//! `roost-test:wrong-world/runner@0.1.0` (one `run` function) and neither `describe`
//! nor `on-message`; the host must refuse it at load, naming what is missing.

wit_bindgen::generate!({
    world: "wrong-world",
    path: "wit",
});

struct Wrong;

impl exports::roost_test::wrong_world::runner::Guest for Wrong {
    fn run() -> String {
        "not a persona".into()
    }
}

export!(Wrong);
