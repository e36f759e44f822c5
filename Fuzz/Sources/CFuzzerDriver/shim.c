// Intentionally empty: the header declares a function of the libFuzzer runtime.
