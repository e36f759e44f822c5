import SystemPackage

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The one way a command writes a new file at a path the user named (restore, flatten,
/// create — and the copy engine's callers): the bytes go to a temporary file beside OUT,
/// and only a complete, flushed file is renamed to OUT. A failed or killed run therefore
/// never leaves anything at OUT that looks complete, and never removes what was there.
///
/// Order (what is on disk if we die there):
/// 1. `.NAME.qbackup-PID-RANDOM.tmp` is created beside OUT (O_EXCL) — OUT untouched;
/// 2. the caller fills `device` — OUT untouched, the temporary file is partial;
/// 3. `commit`: fsync (when durable) → rename onto OUT (refusing to replace an OUT that
///    appeared meanwhile unless `overwrite`) → fsync of the folder (when durable).
/// `discard` (or dropping the value uncommitted) removes only the temporary file.
///
/// An in-place target (`inPlace`: a block device, or `-` for stdout, made by `target`) is
/// the other kind: its `device` is OUT itself, `commit` only flushes and `discard` only
/// closes; a writer fills every byte (zeros included: the old contents stay otherwise),
/// and a stream (stdout) front to back.
public final class OutputFile {
    /// The path the user named.
    public let path: String
    /// Where the bytes go until `commit`.
    public let temporaryPath: String
    /// The temporary file, open for writing.
    public let device: FileDevice
    /// Whether `commit` fsyncs the file and its folder.
    public let durable: Bool
    /// Whether an existing OUT may be replaced (`--force`).
    public let overwrite: Bool
    /// `device` is OUT itself (a block device or stdout), not a temporary file.
    public let inPlace: Bool
    /// OUT is stdout: written front to back, no seeks, no size.
    public let isStream: Bool
    private var finished = false

    /// The output for a path the user named: `-` is stdout, a block device is written in
    /// place (only with `overwrite`: its contents are replaced), anything else as `init`.
    public static func target(_ path: String, overwrite: Bool = false, durable: Bool = false) throws -> OutputFile {
        if path == "-" {
            guard let fd = Optional(dup(STDOUT_FILENO)), fd >= 0 else {
                throw QCowError(.io, "cannot use stdout: \(Errno(rawValue: errno).description)", path: path)
            }
            return OutputFile(inPlace: path, FileDevice(adopting: FileDescriptor(rawValue: fd), name: "stdout", writable: true),
                              stream: true)
        }
        var st = stat()
        guard stat(path, &st) == 0, st.st_mode & S_IFMT == S_IFBLK else {
            return try OutputFile(path, overwrite: overwrite, durable: durable)
        }
        guard overwrite else {
            throw QCowError(.refused, "is a block device: its contents would be overwritten in place; use --force to do that",
                            path: path)
        }
        // O_EXCL on a block device: refused while it is mounted or otherwise held exclusively.
        let fd = open(path, O_WRONLY | O_EXCL | O_CLOEXEC)
        guard fd >= 0 else {
            throw QCowError(.io, "cannot open the block device: \(Errno(rawValue: errno).description)", path: path)
        }
        return OutputFile(inPlace: path, FileDevice(adopting: FileDescriptor(rawValue: fd), name: path, writable: true),
                          stream: false)
    }

    private init(inPlace path: String, _ device: FileDevice, stream: Bool) {
        self.path = path
        temporaryPath = path
        self.device = device
        durable = !stream
        overwrite = true
        inPlace = true
        isStream = stream
    }

    /// The marker in every temporary name, so a leftover of a killed run is recognisable.
    public static let marker = ".qbackup-"

    /// Reserves a temporary file beside `path`. An existing OUT is refused unless
    /// `overwrite`; even then only a regular file (or a symbolic link, which is replaced,
    /// not followed) is replaced.
    public init(_ path: String, overwrite: Bool = false, durable: Bool = false) throws {
        self.path = path
        self.overwrite = overwrite
        self.durable = durable
        inPlace = false
        isStream = false
        try Self.checkTarget(path, overwrite: overwrite)
        let (folder, name) = Self.split(path)
        var created: (String, FileDevice)?
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<16 {
            let candidate = folder + "." + name + Self.marker + "\(getpid())-" + String(rng.next() as UInt64, radix: 36) + ".tmp"
            do {
                let fd = try FileDescriptor.open(
                    FilePath(candidate), .readWrite, options: [.create, .exclusiveCreate, .noFollow, .closeOnExec],
                    permissions: [.ownerReadWrite, .groupRead, .otherRead])
                created = (candidate, FileDevice(adopting: fd, name: candidate, writable: true))
                break
            } catch Errno.fileExists {
                continue
            } catch let errno as Errno {
                throw QCowError(.io, "cannot create a temporary file beside it: \(errno.description)", path: path)
            }
        }
        guard let (temporary, device) = created else {
            throw QCowError(.io, "cannot find a free temporary name beside it", path: path)
        }
        temporaryPath = temporary
        self.device = device
    }

    deinit { if !finished { discard() } }

    /// Makes the complete file OUT: flush (when durable), rename, folder flush (when durable).
    /// The device stays open (an image may still hold it); its owner closes it.
    public func commit() throws {
        precondition(!finished, "an output is committed or discarded once")
        if durable { try device.sync() }
        if inPlace {
            finished = true
            return
        }
        if overwrite {
            try Self.checkTarget(path, overwrite: true)
            guard rename(temporaryPath, path) == 0 else {
                throw QCowError(.io, "cannot rename \(temporaryPath) into place: \(Errno(rawValue: errno).description)",
                                path: path)
            }
        } else {
            // link(2) fails if OUT appeared since `init`: never replace what we did not mean to.
            if link(temporaryPath, path) == 0 {
                unlink(temporaryPath)
            } else {
                let err = Errno(rawValue: errno)
                if err == .fileExists { throw Self.exists(path) }
                // A file system without hard links: check, then rename (a small window, as qemu-img has).
                guard err == .notPermitted || err == .notSupported || err == .tooManyLinks else {
                    throw QCowError(.io, "cannot link \(temporaryPath) into place: \(err.description)", path: path)
                }
                try Self.checkTarget(path, overwrite: false)
                guard rename(temporaryPath, path) == 0 else {
                    throw QCowError(.io, "cannot rename \(temporaryPath) into place: \(Errno(rawValue: errno).description)",
                                    path: path)
                }
            }
        }
        finished = true
        if durable { try Self.syncFolder(of: path) }
    }

    /// Removes the temporary file (only it); OUT is left as it was.
    public func discard() {
        guard !finished else { return }
        finished = true
        device.close()
        if !inPlace { unlink(temporaryPath) }
    }

    // MARK: - Helpers

    /// Refuses an existing OUT unless `overwrite`, and anything but a regular file or a
    /// symbolic link even then.
    static func checkTarget(_ path: String, overwrite: Bool) throws {
        var st = stat()
        guard lstat(path, &st) == 0 else { return }
        guard overwrite else { throw exists(path) }
        let type = st.st_mode & S_IFMT
        guard type == S_IFREG || type == S_IFLNK else {
            throw QCowError(.refused, "is \(FileDevice.kind(st.st_mode)); only a regular file is replaced", path: path)
        }
    }

    static func exists(_ path: String) -> QCowError {
        QCowError(.refused, "the output file exists; use --force to replace it", path: path)
    }

    /// ("dir/", "name") of "dir/name"; ("", "name") of "name".
    static func split(_ path: String) -> (String, String) {
        guard let slash = path.lastIndex(of: "/") else { return ("", path) }
        return (String(path[...slash]), String(path[path.index(after: slash)...]))
    }

    /// fsync of the folder holding `path`, so a rename in it survives a crash.
    public static func syncFolder(of path: String) throws {
        let (folder, _) = split(path)
        let fd = open(folder.isEmpty ? "." : folder, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else {
            throw QCowError(.io, "cannot open the folder: \(Errno(rawValue: errno).description)", path: folder)
        }
        defer { close(fd) }
        if fsync(fd) != 0 {
            throw QCowError(.io, "cannot fsync the folder: \(Errno(rawValue: errno).description)", path: folder)
        }
    }
}
