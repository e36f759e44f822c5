// libFuzzer's driver entry (compiler-rt FuzzerInterface.h). SwiftPM links an
// executable target's entry point as main=<Module>_main, which would hide
// libFuzzer's own main, so each fuzzer's <Module>_main calls the driver itself.
#include <stddef.h>
#include <stdint.h>

int LLVMFuzzerRunDriver(int *argc, char ***argv, int (*UserCb)(const uint8_t *Data, size_t Size));
