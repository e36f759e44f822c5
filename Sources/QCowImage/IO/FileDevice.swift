import SystemPackage

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A `BlockDevice` over a file descriptor, with positional I/O.
public final class FileDevice: BlockDevice, @unchecked Sendable {
    public let name: String
    public let descriptor: FileDescriptor
    public let writable: Bool
    private var closed = false
    /// When set (before the first write), every write and resize is noted in it.
    public var writeLog: WriteLog?

    /// Opens an existing file: a regular file or a block device. Anything else (a FIFO, a
    /// socket, a character device, a folder) is refused before a byte is read, so that no
    /// open or read can hang on it (DESIGN.md: images and backing files).
    public init(path: String, writable: Bool) throws {
        self.name = path
        self.writable = writable
        descriptor = try Self.openStorage(path, writable ? .readWrite : .readOnly, options: [], what: "open")
        CrashSeam.shared.configureFromEnvironment()
    }

    /// Creates a new file (failing if it exists unless `truncate`, which reuses only a
    /// regular file or block device).
    public init(creating path: String, truncate: Bool = false) throws {
        self.name = path
        self.writable = true
        descriptor = try Self.openStorage(path, .readWrite, options: [.create, truncate ? .truncate : .exclusiveCreate],
                                          what: "create")
        CrashSeam.shared.configureFromEnvironment()
    }

    /// Opens `path` without blocking (a FIFO would wait for a peer), refuses what is not a
    /// regular file or block device, then makes the descriptor blocking for positional I/O.
    static func openStorage(_ path: String, _ mode: FileDescriptor.AccessMode, options: FileDescriptor.OpenOptions,
                            what: String) throws -> FileDescriptor {
        let fd: FileDescriptor
        do {
            fd = try FileDescriptor.open(FilePath(path), mode, options: options.union([.closeOnExec, .nonBlocking]),
                                         permissions: [.ownerReadWrite, .groupRead, .otherRead])
        } catch let errno as Errno {
            // A socket cannot be opened at all (ENXIO): say what it is rather than "no such device".
            var st = stat()
            if stat(path, &st) == 0, let kind = unsupportedKind(st.st_mode) { throw notStorage(path, kind) }
            throw QCowError(.io, "cannot \(what): \(errno.description)", path: path)
        }
        var st = stat()
        guard fstat(fd.rawValue, &st) == 0 else {
            let err = Errno(rawValue: errno)
            try? fd.close()
            throw QCowError(.io, "cannot stat: \(err.description)", path: path)
        }
        if let kind = unsupportedKind(st.st_mode) {
            try? fd.close()
            throw notStorage(path, kind)
        }
        _ = fcntl(fd.rawValue, F_SETFL, fcntl(fd.rawValue, F_GETFL) & ~O_NONBLOCK)
        return fd
    }

    /// What a file of `mode` is, in words ("a FIFO", "a block device", ...), for the errors
    /// that refuse it (images, outputs and repository files alike).
    public static func kind(_ mode: mode_t) -> String {
        switch mode & S_IFMT {
        case S_IFREG: "a regular file"
        case S_IFBLK: "a block device"
        case S_IFIFO: "a FIFO"
        case S_IFSOCK: "a socket"
        case S_IFCHR: "a character device"
        case S_IFDIR: "a folder"
        case S_IFLNK: "a symbolic link"
        default: "a special file"
        }
    }

    /// What a file of `mode` is when it is neither a regular file nor a block device, or nil.
    static func unsupportedKind(_ mode: mode_t) -> String? {
        let type = mode & S_IFMT
        return type == S_IFREG || type == S_IFBLK ? nil : kind(mode)
    }

    static func notStorage(_ path: String, _ kind: String) -> QCowError {
        QCowError(.refused, "is \(kind); images and backing files must be regular files or block devices", path: path)
    }

    /// Takes over a descriptor the caller opened (with flags this type does not offer, such
    /// as O_NOFOLLOW); the device closes it.
    public init(adopting descriptor: FileDescriptor, name: String, writable: Bool) {
        self.name = name
        self.writable = writable
        self.descriptor = descriptor
        CrashSeam.shared.configureFromEnvironment()
    }

    deinit { close() }

    /// Set by `ImageLock.acquire`: the descriptor holds QEMU-style lock bytes.
    var holdsImageLocks = false

    /// Closes the descriptor (idempotent). Image locks are released first: a child
    /// process forked meanwhile (before its exec) may keep the open file alive, and
    /// its locks with it, which would make our own next open see a stranger's lock.
    public func close() {
        if !closed {
            closed = true
            if holdsImageLocks { ImageLock.release(descriptor.rawValue) }
            try? direct?.close()
            direct = nil
            try? descriptor.close()
        }
    }

    public func size() throws -> UInt64 {
        var st = stat()
        if fstat(descriptor.rawValue, &st) != 0 {
            throw QCowError(.io, "cannot stat: \(Errno(rawValue: errno).description)", path: name)
        }
        guard st.st_mode & S_IFMT == S_IFBLK else { return UInt64(st.st_size) }
        // A block device's st_size is 0; its end is its size.
        let end = lseek(descriptor.rawValue, 0, SEEK_END)
        guard end >= 0 else { throw QCowError(.io, "cannot find the size: \(Errno(rawValue: errno).description)", path: name) }
        return UInt64(end)
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
        var done = 0
        while done < buffer.count {
            let chunk = UnsafeMutableRawBufferPointer(rebasing: buffer[done...])
            let n: Int
            do {
                n = try descriptor.read(fromAbsoluteOffset: Int64(offset) + Int64(done), into: chunk,
                                        retryOnInterrupt: true)
            } catch let errno as Errno {
                throw QCowError(.io, "read failed: \(errno.description)", path: name, offset: offset + UInt64(done))
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try CrashSeam.shared.beforeWrite()
        writeLog?.wrote(at: offset, length: buffer.count)
        // Again once done: a reader that took the log meanwhile must learn of this write (`WriteLog.take`).
        defer { writeLog?.wrote(at: offset, length: buffer.count) }
        if let observer = writeLog?.observer {
            try observer.observe(buffer, at: offset) { try writeAll(buffer, at: offset) }
        } else {
            try writeAll(buffer, at: offset)
        }
    }

    private func writeAll(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        if let direct, Self.isDirectAligned(buffer, at: offset) {
            var done = 0
            while done < buffer.count {
                let n = pwrite(direct.rawValue, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
                if n > 0 {
                    done += n
                    directBytes += UInt64(n)
                } else if n < 0 && errno == EINTR {
                    continue
                } else if n < 0 && errno == EINVAL && done == 0 {
                    // The file system takes no direct writes of this alignment after all: buffered from now on.
                    try? direct.close()
                    self.direct = nil
                    break
                } else {
                    let why = n < 0 ? Errno(rawValue: errno).description : "no progress"
                    throw QCowError(.io, "write failed: \(why)", path: name, offset: offset + UInt64(done))
                }
            }
            if self.direct != nil { return }
        }
        var done = 0
        while done < buffer.count {
            let chunk = UnsafeRawBufferPointer(rebasing: buffer[done...])
            do {
                done += try descriptor.write(toAbsoluteOffset: Int64(offset) + Int64(done), chunk,
                                             retryOnInterrupt: true)
            } catch let errno as Errno {
                throw QCowError(.io, "write failed: \(errno.description)", path: name, offset: offset + UInt64(done))
            }
        }
    }

    /// A second descriptor of the same file with O_DIRECT, for `writeDirectWhenAligned`.
    private var direct: FileDescriptor?
    /// Bytes written through the O_DIRECT descriptor (for tests and the benchmark's notes).
    public private(set) var directBytes: UInt64 = 0
    static let directAlignment = 4096

    static func isDirectAligned(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) -> Bool {
        guard let base = buffer.baseAddress, !buffer.isEmpty else { return false }
        let a = directAlignment
        return Int(bitPattern: base) % a == 0 && buffer.count % a == 0 && offset % UInt64(a) == 0
    }

    /// From now on, writes whose buffer, offset and length are multiples of 4 KiB bypass the
    /// page cache (O_DIRECT, through a second descriptor of the same open file, reopened by
    /// /proc/self/fd so no path is looked up again): a new layer's data goes to the disk
    /// without being copied into the cache and written back at the fsync, which on a
    /// 2-core host costs as much CPU as reading it from the NBD server. Other writes (metadata,
    /// partial clusters) stay buffered; the kernel keeps the two coherent, and `sync`
    /// flushes both. Returns false (and changes nothing) where the file system or the file
    /// takes no O_DIRECT (tmpfs, a block device's alignment rules, no /proc).
    @discardableResult
    public func writeDirectWhenAligned() -> Bool {
        #if os(Linux)
        guard writable, direct == nil, !closed else { return direct != nil }
        let fd = open("/proc/self/fd/\(descriptor.rawValue)", O_WRONLY | O_DIRECT | O_CLOEXEC)
        guard fd >= 0 else { return false }
        var a = stat(), b = stat()
        guard fstat(fd, &a) == 0, fstat(descriptor.rawValue, &b) == 0, a.st_dev == b.st_dev, a.st_ino == b.st_ino,
              a.st_mode & S_IFMT == S_IFREG else {
            try? FileDescriptor(rawValue: fd).close()
            return false
        }
        direct = FileDescriptor(rawValue: fd)
        return true
        #else
        return false
        #endif
    }

    public func resize(to size: UInt64) throws {
        try CrashSeam.shared.beforeWrite()
        writeLog?.resized(to: size)
        defer { writeLog?.resized(to: size) }
        if ftruncate(descriptor.rawValue, off_t(size)) != 0 {
            throw QCowError(.io, "cannot resize: \(Errno(rawValue: errno).description)", path: name)
        }
    }

    public func sync() throws {
        try CrashSeam.shared.beforeSync()
        if fsync(descriptor.rawValue) != 0 {
            throw QCowError(.io, "fsync failed: \(Errno(rawValue: errno).description)", path: name)
        }
    }

    /// The next data region at or after `offset` (SEEK_DATA), or nil when only a hole remains.
    public func nextData(from offset: UInt64) -> UInt64? {
        let r = lseek(descriptor.rawValue, off_t(offset), SEEK_DATA)
        return r < 0 ? nil : UInt64(r)
    }

    /// The next hole at or after `offset` (SEEK_HOLE); the end of file counts as a hole.
    public func nextHole(from offset: UInt64) -> UInt64? {
        let r = lseek(descriptor.rawValue, off_t(offset), SEEK_HOLE)
        return r < 0 ? nil : UInt64(r)
    }
}
