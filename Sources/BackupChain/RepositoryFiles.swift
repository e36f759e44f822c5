import QCowImage
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// The files of a repository are untrusted input (DESIGN.md, Repository integrity): each is a
/// regular file directly inside the repository folder, opened without following a symbolic
/// link, so nothing outside the folder is ever read or written through one of its names —
/// layers, their backing files, the manifest and its temporary file, the lock file.
public struct RepositoryFiles: FileOpener {
    /// The repository folder, as the repository's paths spell it.
    public let directory: String
    /// Whether `open(_:writable:lock:)` takes QEMU's image locks when asked; false when the
    /// caller already holds them on other descriptors of the same files (see `MergeEngine`).
    public var takesLocks: Bool

    public init(directory: String, takesLocks: Bool = true) {
        self.directory = directory
        self.takesLocks = takesLocks
    }

    /// Opens the layer file at `path` (DIR/NAME); with `lock`, takes QEMU's image lock.
    /// A file opened for writing must have no other hard link: writing it would change the
    /// copies (`cp -al`) that share it.
    public func open(_ path: String, writable: Bool, lock: Bool) throws -> BlockDevice {
        let device = try openFile(path, writable: writable)
        if writable, let links = Self.linkCount(device), links > 1 {
            device.close()
            throw QCowError(.refused, "has \(links) hard links; qbackup never modifies a file another copy shares",
                             path: path)
        }
        if lock && takesLocks {
            do {
                try ImageLock.acquire(device, writable: writable)
            } catch {
                device.close()
                throw error
            }
        }
        return device
    }

    public func canonicalPath(_ path: String) -> String? { path }

    /// Opens the file at `path` (DIR/NAME), a regular file not reached through a symbolic link; no locks.
    func openFile(_ path: String, writable: Bool) throws -> FileDevice {
        try checkInside(path)
        let fd = try Self.openRegular(path, flags: writable ? O_RDWR : O_RDONLY)
        return FileDevice(adopting: FileDescriptor(rawValue: fd), name: path, writable: writable)
    }

    /// Refuses a path that is not a plain name directly inside the folder (a backing file
    /// name such as `../disk.qcow2` or `/etc/x` leads outside).
    func checkInside(_ path: String) throws {
        let prefix = directory.hasSuffix("/") ? directory : directory + "/"
        let name = path.hasPrefix(prefix) ? String(path.dropFirst(prefix.count)) : ""
        guard !name.isEmpty, !name.contains("/"), name != ".", name != ".." else {
            throw QCowError(.refused, "is not a file directly inside the repository folder \(directory)", path: path)
        }
    }

    // MARK: - Descriptors

    /// Opens `path` with `flags` (plus O_NOFOLLOW and O_CLOEXEC), refusing a symbolic link and
    /// anything but a regular file. O_NONBLOCK while opening, so a FIFO cannot hang the open.
    static func openRegular(_ path: String, flags: Int32, mode: mode_t = 0o644) throws -> Int32 {
        let fd = Glibc.open(path, flags | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, mode)
        if fd < 0 {
            let err = errno
            if err == ELOOP { throw notRegular(path, "a symbolic link") }
            throw QCowError(.io, "cannot open: \(String(cString: strerror(err)))", path: path)
        }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let err = errno
            Glibc.close(fd)
            throw QCowError(.io, "cannot stat: \(String(cString: strerror(err)))", path: path)
        }
        guard st.st_mode & S_IFMT == S_IFREG else {
            Glibc.close(fd)
            throw notRegular(path, FileDevice.kind(st.st_mode))
        }
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK)
        return fd
    }

    /// Creates `path` anew (O_EXCL: an existing name, a symbolic link included, is never
    /// followed or reused). A regular file already there that no other name shares is a
    /// leftover of a killed run: it is replaced; anything else is refused.
    static func createFresh(_ path: String) throws -> Int32 {
        for _ in 0..<2 {
            let fd = Glibc.open(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o644)
            if fd >= 0 { return fd }
            let err = errno
            guard err == EEXIST else {
                throw QCowError(.io, "cannot create: \(String(cString: strerror(err)))", path: path)
            }
            var st = stat()
            guard lstat(path, &st) == 0 else { continue }
            guard st.st_mode & S_IFMT == S_IFREG else { throw notRegular(path, FileDevice.kind(st.st_mode)) }
            guard st.st_nlink == 1 else {
                throw QCowError(.refused, "has \(st.st_nlink) hard links; qbackup never writes a file another copy shares",
                                 path: path)
            }
            if unlink(path) != 0 && errno != ENOENT {
                throw QCowError(.io, "cannot remove a leftover: \(String(cString: strerror(errno)))", path: path)
            }
        }
        throw QCowError(.io, "cannot create: the name keeps reappearing", path: path)
    }

    static func notRegular(_ path: String, _ what: String) -> QCowError {
        QCowError(.refused, "is \(what), not a regular file; a repository's files must be regular files inside its folder",
                   path: path)
    }

    /// How many names the file of `device` has (nil if it is not a file descriptor device).
    static func linkCount(_ device: BlockDevice) -> Int? {
        guard let file = device as? FileDevice else { return nil }
        var st = stat()
        guard fstat(file.descriptor.rawValue, &st) == 0 else { return nil }
        return Int(st.st_nlink)
    }

    /// How many names the file at `path` has, without following a symbolic link (nil if absent).
    static func linkCount(_ path: String) -> Int? {
        var st = stat()
        guard lstat(path, &st) == 0 else { return nil }
        return Int(st.st_nlink)
    }
}
