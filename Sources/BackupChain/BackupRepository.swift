import Foundation
import QCowImage
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// A backup repository: one folder holding one disk's chain of qcow2 layers
/// and `manifest.json`. Opening it for changes takes an exclusive lock, so two
/// qbackup runs never change one repository at once.
public final class BackupRepository {
    public let path: String
    public private(set) var manifest: BackupManifest?
    private var lockFD: Int32 = -1

    static let lockName = ".qbackup.lock"
    static let tempSuffix = ".partial"

    /// Opens the repository at `path` (the folder may not exist yet when `create`).
    /// `exclusive` takes the repository lock for changes; otherwise a shared one.
    /// With `allowMissing`, a folder that does not exist opens as an empty repository
    /// without creating anything (a dry run of the first backup).
    /// A lock held by another process is waited for up to `wait` seconds (0: not at all),
    /// then refused as `locked`, naming the holder when the system tells.
    public init(path: String, create: Bool = false, exclusive: Bool, allowMissing: Bool = false,
                wait: Double = 0) throws {
        self.path = path
        var isDir: ObjCBool = false
        if !FileManager.default.fileExists(atPath: path, isDirectory: &isDir) {
            if allowMissing && !create {
                manifest = nil
                return
            }
            guard create else { throw ChainError(.invalidArgument, "no such repository folder", path: path) }
            try Self.createFolders(path)
        } else if !isDir.boolValue {
            throw ChainError(.invalidArgument, "not a folder", path: path)
        }
        do {
            lockFD = try RepositoryFiles.openRegular(file(Self.lockName), flags: O_RDWR | O_CREAT)
        } catch let error as QCowError where error.code == .io && !exclusive {
            // A read-only repository (mounted backup media): read without the lock.
            lockFD = -1
        }
        if lockFD >= 0 {
            do {
                try RepositoryLock.take(lockFD, exclusive: exclusive, wait: wait, path: path)
            } catch {
                Glibc.close(lockFD)
                lockFD = -1
                throw error
            }
        }
        manifest = try loadManifest()
    }

    deinit {
        if lockFD >= 0 { Glibc.close(lockFD) }
    }

    /// mkdir -p, with the system's reason and the component it concerns in the error
    /// (Foundation's createDirectory reports only "NSCocoaErrorDomain error 512").
    static func createFolders(_ path: String) throws {
        var prefix = path.hasPrefix("/") ? "/" : ""
        for part in path.split(separator: "/") {
            prefix += part
            if mkdir(prefix, 0o755) != 0 && errno != EEXIST {
                let reason = errno == ENOTDIR ? "a part of the path is not a folder" : String(cString: strerror(errno))
                throw ChainError(.io, "cannot create the repository folder: \(prefix): \(reason)", path: path)
            }
            var st = stat()
            if stat(prefix, &st) == 0 && st.st_mode & S_IFMT != S_IFDIR {
                throw ChainError(.io, "cannot create the repository folder: \(prefix) is a file, not a folder", path: path)
            }
            prefix += "/"
        }
    }

    /// `path/name`
    public func file(_ name: String) -> String { "\(path)/\(name)" }

    public var manifestPath: String { file(BackupManifest.fileName) }

    func loadManifest() throws -> BackupManifest? {
        guard DurableFiles.exists(manifestPath) else { return nil }
        let device = FileDevice(adopting: FileDescriptor(rawValue: try RepositoryFiles.openRegular(manifestPath, flags: O_RDONLY)),
                                name: manifestPath, writable: false)
        defer { device.close() }
        let size = try device.size()
        guard size <= UInt64(BackupManifest.maxBytes) else {
            throw ChainError(.invalidFormat, "manifest is \(size) bytes, more than the limit of \(BackupManifest.maxBytes)",
                             path: manifestPath)
        }
        let bytes = try device.readBytes(Int(size), at: 0, region: "manifest")
        return try BackupManifest(validating: Data(bytes), path: manifestPath)
    }

    /// Writes the manifest atomically and durably.
    func save(_ new: BackupManifest) throws {
        try new.validate(path: manifestPath)
        try DurableFiles.replace(manifestPath, with: try new.encoded())
        manifest = new
    }

    /// Removes leftovers of interrupted runs: `*.partial` files, a stale manifest
    /// temp, and layer files (by qbackup's naming) that the manifest does not list —
    /// a layer renamed into place just before a crash, or folded by a merge.
    func removeLeftovers() throws {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []
        let listed = Set(manifest?.layers.map(\.file) ?? [])
        for name in names {
            let stale = name.hasSuffix(Self.tempSuffix) || name == BackupManifest.fileName + ".tmp"
                || (Self.isLayerFileName(name) && !listed.contains(name))
            if stale { try DurableFiles.remove(file(name)) }
        }
    }

    /// Names qbackup gives layers: `full-20261125T094800Z.qcow2`, `incr-20261125T094800Z-2.qcow2`.
    /// (Matched by hand: a regular expression costs more to build than a backup's bookkeeping.)
    static func isLayerFileName(_ name: String) -> Bool {
        let b = Array(name.utf8)
        func digits(_ range: Range<Int>) -> Bool { range.allSatisfy { b[$0] >= 0x30 && b[$0] <= 0x39 } }
        // KIND-YYYYMMDDTHHMMSSZ is 20 bytes, ".qcow2" 6.
        guard b.count >= 26, name.hasPrefix("full-") || name.hasPrefix("incr-"), name.hasSuffix(".qcow2"),
              digits(5..<13), b[13] == UInt8(ascii: "T"), digits(14..<20), b[20] == UInt8(ascii: "Z")
        else { return false }
        let rest = b[21..<(b.count - 6)]
        return rest.isEmpty || (rest.count >= 2 && rest.first == UInt8(ascii: "-") && digits((rest.startIndex + 1)..<rest.endIndex))
    }

    /// A new layer file name that is not in use: `KIND-YYYYMMDDTHHMMSSZ[-N].qcow2`.
    func newLayerName(kind: BackupManifest.Layer.Kind, at date: Date) -> String {
        let stamp = Self.compactStamp(date)
        let prefix = kind == .full ? "full" : "incr"
        var name = "\(prefix)-\(stamp).qcow2"
        var n = 1
        let used = Set(manifest?.layers.map(\.file) ?? [])
        while used.contains(name) || DurableFiles.exists(file(name)) {
            n += 1
            name = "\(prefix)-\(stamp)-\(n).qcow2"
        }
        return name
    }

    static func compactStamp(_ date: Date) -> String {
        let f = DateFormatter()
        f.locale = Locale(identifier: "en_US_POSIX")
        f.timeZone = TimeZone(identifier: "UTC")
        f.dateFormat = "yyyyMMdd'T'HHmmss'Z'"
        return f.string(from: date)
    }

    static func isoStamp(_ date: Date) -> String {
        let f = ISO8601DateFormatter()
        f.formatOptions = [.withInternetDateTime]
        f.timeZone = TimeZone(identifier: "UTC")
        return f.string(from: date)
    }

    /// A new random repository id (16 hex digits).
    public static func newID() -> String {
        var rng = SystemRandomNumberGenerator()
        return String(format: "%016llx", rng.next() as UInt64)
    }
}
