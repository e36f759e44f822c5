// Linux constants that Glibc hides behind _GNU_SOURCE, which Swift does not define.
let SEEK_DATA: Int32 = 3
let SEEK_HOLE: Int32 = 4
let F_OFD_GETLK: Int32 = 36
let F_OFD_SETLK: Int32 = 37
#if arch(arm64) || arch(arm)
let O_DIRECT: Int32 = 0o200000
#else
let O_DIRECT: Int32 = 0o40000
#endif
