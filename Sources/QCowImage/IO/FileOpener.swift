#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Where the files an image names (backing files, external data files) come
/// from: the file system for the tools, memory for fuzzing and tests.
public protocol FileOpener {
    /// Opens `path`; with `lock`, takes QEMU's image lock for reading or writing.
    func open(_ path: String, writable: Bool, lock: Bool) throws -> BlockDevice
    /// The canonical name of `path`, to recognise one file reached by two names; nil if unknown.
    func canonicalPath(_ path: String) -> String?
}

/// The file system, with QEMU's image locks.
public struct LocalFiles: FileOpener {
    public init() {}

    public func open(_ path: String, writable: Bool, lock: Bool) throws -> BlockDevice {
        let device = try FileDevice(path: path, writable: writable)
        if lock { try ImageLock.acquire(device, writable: writable) }
        return device
    }

    public func canonicalPath(_ path: String) -> String? {
        guard let p = realpath(path, nil) else { return nil }
        defer { free(p) }
        return String(cString: p)
    }
}

/// Files held in memory by path, for fuzzing and tests: nothing touches the file system.
public final class MemoryFiles: FileOpener {
    public private(set) var devices: [String: MemoryDevice] = [:]

    public init(_ files: [String: [UInt8]] = [:]) {
        for (path, bytes) in files { devices[path] = MemoryDevice(name: path, bytes: bytes) }
    }

    public func add(_ path: String, _ bytes: [UInt8]) { devices[path] = MemoryDevice(name: path, bytes: bytes) }

    public func open(_ path: String, writable: Bool, lock: Bool) throws -> BlockDevice {
        guard let device = devices[path] else {
            throw QCowError(.io, "No such file or directory", path: path)
        }
        return device
    }

    public func canonicalPath(_ path: String) -> String? { devices[path] == nil ? nil : path }
}
