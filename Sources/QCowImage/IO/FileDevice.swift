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

    /// Opens an existing file.
    public init(path: String, writable: Bool) throws {
        self.name = path
        self.writable = writable
        do {
            descriptor = try FileDescriptor.open(
                FilePath(path), writable ? .readWrite : .readOnly, options: [.closeOnExec])
        } catch let errno as Errno {
            throw QCowError(.io, "cannot open: \(errno.description)", path: path)
        }
        CrashSeam.shared.configureFromEnvironment()
    }

    /// Creates a new file (failing if it exists unless `truncate`).
    public init(creating path: String, truncate: Bool = false) throws {
        self.name = path
        self.writable = true
        var options: FileDescriptor.OpenOptions = [.create, .closeOnExec]
        options.insert(truncate ? .truncate : .exclusiveCreate)
        do {
            descriptor = try FileDescriptor.open(
                FilePath(path), .readWrite, options: options, permissions: [.ownerReadWrite, .groupRead, .otherRead])
        } catch let errno as Errno {
            throw QCowError(.io, "cannot create: \(errno.description)", path: path)
        }
        CrashSeam.shared.configureFromEnvironment()
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
            try? descriptor.close()
        }
    }

    public func size() throws -> UInt64 {
        var st = stat()
        if fstat(descriptor.rawValue, &st) != 0 {
            throw QCowError(.io, "cannot stat: \(Errno(rawValue: errno).description)", path: name)
        }
        return UInt64(st.st_size)
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

    public func resize(to size: UInt64) throws {
        try CrashSeam.shared.beforeWrite()
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
