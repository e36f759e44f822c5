import Crypto
import FoundationEssentials
import QCowImage
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// File operations in the order durability needs: write to a temporary name,
/// fsync, rename, fsync the directory.
enum DurableFiles {
    /// Replaces `path` atomically with `data`: temp file, fsync, rename, directory fsync.
    static let tempSuffix = ".tmp"

    static func replace(_ path: String, with data: Data) throws {
        let temp = path + tempSuffix
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
        let dir = FilePath(path).removingLastComponent().string
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

    /// Whether a name exists (a symbolic link counts, even a dangling one: it is never followed).
    static func exists(_ path: String) -> Bool {
        var st = stat()
        return lstat(path, &st) == 0
    }
}
