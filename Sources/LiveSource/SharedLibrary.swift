import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// A C library a live mode needs, opened with dlopen only when that mode runs (DESIGN,
/// Modules), and its functions looked up by name: the one loader behind `LibNBD` and `LibVirt`.
struct SharedLibrary {
    let soname: String
    private let handle: UnsafeMutableRawPointer
    /// Said when a function is missing: the oldest version that has them all.
    private let minimum: String

    /// Opens `soname`; `needed` says who needs it and how to install it when it is not there.
    init(_ soname: String, needed: (String) -> String, minimum: String) throws {
        guard let handle = dlopen(soname, RTLD_NOW | RTLD_LOCAL) else {
            let why = dlerror().map { String(cString: $0) } ?? "not found"
            throw LiveError(.unsupported, needed(why))
        }
        self.soname = soname
        self.handle = handle
        self.minimum = minimum
    }

    /// The function `name` as the C type `T`.
    func symbol<T>(_ name: String, _: T.Type) throws -> T {
        guard let p = dlsym(handle, name) else {
            throw LiveError(.unsupported, "\(soname) has no \(name); qbackup needs \(minimum) or later")
        }
        return unsafeBitCast(p, to: T.self)
    }
}
