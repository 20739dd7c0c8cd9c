//! The simulation's tests: bounded seeds for CI, determinism, proof that the checks fail
//! when the model is broken, and the issues the simulation found (fixed; kept as
//! regression tests).

mod checker;
mod found;
mod seeds;
