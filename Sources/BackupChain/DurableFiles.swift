import Crypto
import Foundation
import QCowImage
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// File operations in the order durability needs: write to a temporary name,
/// fsync, rename, fsync the directory.
enum DurableFiles {
    /// Replaces `path` atomically with `data`: temp file, fsync, rename, directory fsync.
    static func replace(_ path: String, with data: Data) throws {
        let temp = path + ".tmp"
        let device = FileDevice(adopting: FileDescriptor(rawValue: try RepositoryFiles.createFresh(temp)), name: temp,
                                writable: true)
        do {
            try data.withUnsafeBytes { try device.write($0, at: 0) }
            try device.sync()
            device.close()
        } catch {
            device.close()
            unlink(temp)
            throw error
        }
        try rename(temp, to: path)
    }

    /// rename(2) then fsync of the directory, so the new name survives a crash.
    static func rename(_ from: String, to: String) throws {
        if Glibc.rename(from, to) != 0 {
            throw ChainError(.io, "cannot rename \(from) to \(to): \(String(cString: strerror(errno)))")
        }
        try syncDirectory(of: to)
    }

    /// fsync of the directory holding `path`.
    static func syncDirectory(of path: String) throws {
        let dir = (path as NSString).deletingLastPathComponent
        let fd = open(dir.isEmpty ? "." : dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw ChainError(.io, "cannot open directory: \(String(cString: strerror(errno)))", path: dir) }
        defer { close(fd) }
        if fsync(fd) != 0 { throw ChainError(.io, "cannot fsync directory: \(String(cString: strerror(errno)))", path: dir) }
    }

    /// Removes a file and syncs its directory; a missing file is fine.
    static func remove(_ path: String) throws {
        if unlink(path) != 0 && errno != ENOENT {
            throw ChainError(.io, "cannot remove: \(String(cString: strerror(errno)))", path: path)
        }
        try syncDirectory(of: path)
    }

    /// SHA-256 of a repository file (a regular file, not followed through a symlink), hex.
    static func sha256(of path: String) throws -> (hex: String, size: UInt64) {
        let device = FileDevice(adopting: FileDescriptor(rawValue: try RepositoryFiles.openRegular(path, flags: O_RDONLY)),
                                name: path, writable: false)
        defer { device.close() }
        return try sha256(of: device)
    }

    /// SHA-256 of a file, computed on another thread while `work` runs (an fsync of the
    /// same, already final file: the hash reads the page cache while the disk writes).
    static func sha256(of path: String, during work: () throws -> Void) throws -> (hex: String, size: UInt64) {
        final class Outcome: @unchecked Sendable { var digest: Result<(hex: String, size: UInt64), Error>? }
        let outcome = Outcome()
        let done = DispatchSemaphore(value: 0)
        DispatchQueue.global().async {
            outcome.digest = Result { try sha256(of: path) }
            done.signal()
        }
        let failure: Error?
        do {
            try work()
            failure = nil
        } catch {
            failure = error
        }
        done.wait()
        if let failure { throw failure }
        return try outcome.digest!.get()
    }

    /// SHA-256 of a device's bytes, hex, read in 1 MiB pieces.
    static func sha256(of device: BlockDevice) throws -> (hex: String, size: UInt64) {
        var hasher = SHA256()
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        var offset: UInt64 = 0
        while true {
            let n = try buffer.withUnsafeMutableBytes { try device.read(into: $0, at: offset) }
            if n == 0 { break }
            buffer.withUnsafeBytes { hasher.update(bufferPointer: UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
            offset += UInt64(n)
        }
        let hex = hasher.finalize().map { String(format: "%02x", $0) }.joined()
        return (hex, offset)
    }

    /// Whether a name exists (a symbolic link counts, even a dangling one: it is never followed).
    static func exists(_ path: String) -> Bool {
        var st = stat()
        return lstat(path, &st) == 0
    }
}
