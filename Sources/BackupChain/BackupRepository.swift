import FoundationEssentials
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
    /// This run made the folder (a first backup): `removeIfUnused` may take it away again.
    private var createdFolder = false
    /// The folder had no manifest when opened.
    private var startedEmpty = false
    /// Why the manifest could not be read (only when opened `tolerant`).
    public private(set) var manifestProblem: String?

    static let lockName = ".qbackup.lock"
    static let tempSuffix = ".partial"

    /// Opens the repository at `path` (the folder may not exist yet when `create`).
    /// `exclusive` takes the repository lock for changes; otherwise a shared one.
    /// With `allowMissing`, a folder that does not exist opens as an empty repository
    /// without creating anything (a dry run of the first backup).
    /// A lock held by another process is waited for up to `wait` seconds (0: not at all),
    /// then refused as `locked`, naming the holder when the system tells.
    /// With `tolerant` (repair), a manifest that cannot be read opens as none, its problem kept
    /// in `manifestProblem`.
    /// Without `createLock` a missing lock file is not made (a shared open then takes no lock:
    /// a run that only looks changes nothing in the folder).
    /// The top folder of a group of disk repositories (see `groupDisks`) is refused, before
    /// anything is written, unless `groupTop` (the libvirt backup that keeps the group).
    public init(path: String, create: Bool = false, exclusive: Bool, allowMissing: Bool = false,
                wait: Double = 0, tolerant: Bool = false, createLock: Bool = true, groupTop: Bool = false) throws {
        self.path = path
        var isDir = false
        if !FileManager.default.fileExists(atPath: path, isDirectory: &isDir) {
            if allowMissing && !create {
                manifest = nil
                return
            }
            guard create else { throw ChainError(.invalidArgument, "no such repository folder", path: path) }
            createdFolder = true
            try Self.createFolders(path)
        } else if !isDir {
            throw ChainError(.invalidArgument, "not a folder", path: path)
        } else if !groupTop {
            try Self.refuseGroupTop(path)
        }
        do {
            lockFD = try RepositoryFiles.openRegular(file(Self.lockName), flags: O_RDWR | (createLock ? O_CREAT : 0))
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
        do {
            manifest = try loadManifest()
        } catch let error as CodedError where tolerant {
            manifest = nil
            manifestProblem = error.description
        } catch let error as ChainError where error.errorCode == .invalidFormat {
            throw ChainError(.invalidFormat, "\(error.message); run 'qbackup repair \(path)' to rebuild it from the layer files",
                             path: error.path)
        }
        startedEmpty = manifest == nil
        if manifest?.receivedFold != nil { try finishReceivedFold(exclusive: exclusive, wait: wait) }
    }

    /// A replica whose receive died while it switched in a fold from its source is finished by
    /// the next run that opens it (the fold's record is durable only once its new file is complete
    /// and flushed, see `ReceivedFold`), so every command sees the source's points. A reader
    /// holds the lock for changes for that moment.
    private func finishReceivedFold(exclusive: Bool, wait: Double) throws {
        guard lockFD >= 0 else {
            throw ChainError(.refused, "a fold received from the source was interrupted; the next 'qbackup receive' into the replica (with write access) finishes it",
                             path: path)
        }
        if !exclusive {
            try RepositoryLock.take(lockFD, exclusive: true, wait: wait, path: path)
            manifest = try loadManifest()
        }
        try ReceivedFold.finish(self)
        if !exclusive { try RepositoryLock.take(lockFD, exclusive: false, wait: wait, path: path) }
    }

    /// After a failed first backup: the manifest this run wrote (no layer in it), the files its
    /// journal names and, when this run made it, the folder itself are removed — nothing else.
    public func removeIfUnused() {
        guard startedEmpty, lockFD >= 0, manifest?.layers.isEmpty ?? true else { return }
        for name in manifest?.journalFiles ?? [] { unlink(file(name)) }
        if manifest != nil {
            unlink(manifestPath)
            manifest = nil
        }
        if createdFolder {
            Glibc.close(lockFD)
            lockFD = -1
            unlink(file(Self.lockName))
            rmdir(path)
        }
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

    /// The record of a libvirt backup of several disks, at the top of the folder that holds one
    /// repository per disk (DIR/vda, DIR/vdb); such a folder has no manifest of its own.
    public static let groupRecordName = "libvirt-group.json"

    /// When `path` is the top folder of a group of disk repositories (a group record and no
    /// manifest): the disks whose repositories it holds (sub-folders with a manifest, sorted);
    /// nil otherwise. A group record that is a symbolic link or not a regular file is refused.
    public static func groupDisks(_ path: String) throws -> [String]? {
        let record = "\(path)/\(groupRecordName)"
        var st = stat()
        guard lstat(record, &st) == 0 else {
            if errno == ENOENT || errno == ENOTDIR { return nil }
            throw ChainError(.io, "cannot read: \(String(cString: strerror(errno)))", path: record)
        }
        guard st.st_mode & S_IFMT == S_IFREG else {
            throw ChainError(.invalidFormat, "not a regular file (a group record is never read through a symbolic link)", path: record)
        }
        if lstat("\(path)/\(BackupManifest.fileName)", &st) == 0 { return nil }
        let names = (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []
        return names.filter { name in
            guard !name.hasPrefix(".") else { return false }
            var folder = stat(), manifest = stat()
            return lstat("\(path)/\(name)", &folder) == 0 && folder.st_mode & S_IFMT == S_IFDIR
                && lstat("\(path)/\(name)/\(BackupManifest.fileName)", &manifest) == 0 && manifest.st_mode & S_IFMT == S_IFREG
        }.sorted()
    }

    /// Refuses the top folder of a group of disk repositories as a repository (naming its disks'
    /// repositories), before anything is written; any other folder passes.
    public static func refuseGroupTop(_ path: String) throws {
        guard let disks = try groupDisks(path) else { return }
        let named = disks.isEmpty ? "none backed up yet" : disks.joined(separator: ", ")
        throw ChainError(.invalidArgument,
                         "\(path) holds the repositories of several disks (\(named)); name one: \(path)/\(disks.first ?? "<disk>")")
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

    /// Writes the manifest atomically and durably. Each layer's sidecar that differs from its
    /// record is written (durably) first, so `repair` finds every listed layer described
    /// beside it; a version 1 model is upgraded (its layers hashed) on the way.
    func save(_ new: BackupManifest) throws {
        var new = new
        if new.version == 1 { new = try upgraded(new) }
        try new.validate(path: manifestPath)
        for layer in new.layers { try writeSidecar(layer, of: new) }
        try DurableFiles.replace(manifestPath, with: try new.encoded())
        manifest = new
    }

    /// Sidecars known to be on disk as recorded (file name → contents), to skip rewriting them.
    private var sidecarsOnDisk: [String: LayerSidecar] = [:]

    private func writeSidecar(_ layer: BackupManifest.Layer, of manifest: BackupManifest) throws {
        let record = LayerSidecar(manifest: manifest, layer: layer)
        let name = LayerSidecar.fileName(of: layer.file)
        if sidecarsOnDisk[name] == record { return }
        if sidecarsOnDisk[name] == nil, let existing = try? LayerSidecar.read(file(name)), existing == record {
            sidecarsOnDisk[name] = record
            return
        }
        try DurableFiles.replace(file(name), with: try record.encoded())
        sidecarsOnDisk[name] = record
    }

    /// The names qbackup writes next to a new layer file NAME, to be journaled before any
    /// is created: NAME.partial, NAME, its sidecar and the sidecar's temporary file.
    static func namesCreated(forLayer name: String) -> [String] {
        let sidecar = LayerSidecar.fileName(of: name)
        return [name + tempSuffix, name, sidecar, sidecar + DurableFiles.tempSuffix]
    }

    /// `new` with `layers` (and their sidecars) dropped from it, saved with them in the journal;
    /// then their files are removed and the journal forgets them.
    /// `sidecarsOf`: layer files (renamed meanwhile) whose sidecars alone are dropped.
    func saveDropping(_ new: BackupManifest, files: [String], sidecarsOf renamed: [String] = []) throws {
        var m = new
        let names = files.flatMap { [$0, LayerSidecar.fileName(of: $0)] } + renamed.map(LayerSidecar.fileName(of:))
        m.journal += names.map { BackupManifest.JournalEntry(file: $0) }
        try save(m)
        for name in names { try DurableFiles.remove(file(name)) }
        m.journal.removeAll { $0.file.map(names.contains) ?? false }
        try save(m)
    }

    /// Removes what interrupted runs left behind: every file the journal names that no layer
    /// (or a layer's sidecar) claims. Nothing else is ever removed — files that neither the
    /// manifest nor the journal names are foreign (a user's file, even one named like a layer).
    func removeLeftovers() throws {
        guard var m = manifest, !m.journalFiles.isEmpty else { return }
        let owned = Set(m.layers.flatMap { [$0.file, LayerSidecar.fileName(of: $0.file)] })
        for name in m.journalFiles where !owned.contains(name) {
            try DurableFiles.remove(file(name))
            sidecarsOnDisk[name] = nil
        }
        m.journal.removeAll { $0.file != nil }
        try save(m)
    }

    /// Before any change: a folder whose manifest is missing while layer sidecars are there, or
    /// whose sidecars name layers of this repository that the manifest does not list, is refused
    /// (`qbackup repair DIR` rebuilds the manifest); nothing of it is touched.
    /// With a manifest, a sidecar whose layer file is missing, not a regular file or not of its
    /// recorded size and modification time is a misfit `repair` left out (it never deletes one),
    /// not a lost layer: it does not block the repository.
    func requireIntact() throws {
        let listed = Set((manifest?.layers.map(\.file) ?? []) + (manifest?.journalFiles ?? []))
        let strays = sidecars().filter { name, sidecar in
            guard !listed.contains(sidecar.layer.file), !(manifest?.journalFiles.contains(name) ?? false) else { return false }
            guard let m = manifest else { return true }
            return sidecar.repository.id == m.id && holdsRecordedFile(sidecar.layer)
        }
        guard strays.isEmpty else {
            let files = strays.map(\.1.layer.file).sorted()
            let shown = files.prefix(3).joined(separator: ", ") + (files.count > 3 ? ", …" : "")
            let what = manifest == nil ? "has no manifest but holds \(files.count) layer file(s) with sidecars (\(shown))"
                : "holds \(files.count) layer file(s) of this repository that the manifest does not list (\(shown))"
            throw ChainError(.refused, "the repository \(what); nothing was changed — run 'qbackup repair \(path)' to rebuild the manifest",
                             path: path)
        }
    }

    /// A replica mirrors its source's points (DESIGN.md, Replication): `what` (backup, merge)
    /// is refused on it — it is changed only by `receive`.
    public func refuseReplica(_ what: String) throws {
        guard let origin = manifest?.replicaOf else { return }
        throw ChainError(.refused, "the repository is a replica of \(origin): \(what) is refused (run it on the source and replicate; a replica follows its source's retention)",
                         path: path)
    }

    /// Names in the folder that are not the repository's: neither a layer, a layer's sidecar, a
    /// journaled file nor the manifest, its temporary file or the lock. They are never touched.
    public func foreignFiles() -> [String] {
        let m = manifest
        var own: Set<String> = [BackupManifest.fileName, BackupManifest.fileName + DurableFiles.tempSuffix, Self.lockName]
        for layer in m?.layers ?? [] { own.formUnion([layer.file, LayerSidecar.fileName(of: layer.file)]) }
        own.formUnion(m?.journalFiles ?? [])
        let names = (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []
        return names.filter { !own.contains($0) }.sorted()
    }

    /// The index the next layer of `m` gets: one past the newest it lists, and past every index
    /// a sidecar of this repository in the folder claims (a layer `repair` left out keeps its
    /// index: indices are never reused).
    func nextIndex(of m: BackupManifest) -> Int {
        let claimed = sidecars().filter { $0.1.repository.id == m.id }.map { $0.1.layer.index + 1 }
        return max(m.nextIndex, claimed.max() ?? 0)
    }

    /// Whether `layer`'s file is a regular file of the size and modification time its record says
    /// (the inode is not compared: a copy of the repository keeps neither).
    func holdsRecordedFile(_ layer: BackupManifest.Layer) -> Bool {
        var st = stat()
        guard lstat(file(layer.file), &st) == 0, st.st_mode & S_IFMT == S_IFREG else { return false }
        guard let recorded = layer.identity else { return true }
        let now = LayerDigest.identity(st)
        return now.size == recorded.size && now.mtime == recorded.mtime
    }

    /// The layer sidecars in the folder (name → record); unreadable ones are left out.
    func sidecars() -> [(String, LayerSidecar)] { readSidecars().records }

    /// The layer sidecars in the folder (name → record), and those that cannot be used, each
    /// with the reason (read as untrusted input: no symlink, bounded, validated; a record must
    /// describe the layer file its name is beside).
    func readSidecars() -> (records: [(String, LayerSidecar)], unreadable: [(name: String, reason: String)]) {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []
        var records: [(String, LayerSidecar)] = []
        var unreadable: [(name: String, reason: String)] = []
        for name in names.sorted() where LayerSidecar.isSidecarName(name) {
            do {
                let record = try LayerSidecar.read(file(name))
                guard LayerSidecar.fileName(of: record.layer.file) == name else {
                    unreadable.append((name, "it describes \(record.layer.file), not the file it is beside"))
                    continue
                }
                records.append((name, record))
            } catch {
                unreadable.append((name, (error as? CodedError)?.description ?? "\(error)"))
            }
        }
        return (records, unreadable)
    }

    /// `manifest` with every layer not yet hashed in chunks (read from version 1) hashed once:
    /// a file that still matches its version 1 checksum gets its chunks and identity; one that
    /// does not (or is missing) is marked damaged — reported, never trusted.
    func upgraded(_ manifest: BackupManifest) throws -> BackupManifest {
        var m = manifest
        for i in m.layers.indices where m.layers[i].chunks == nil && m.layers[i].damaged == nil {
            let layer = m.layers[i]
            do {
                let (digest, identity) = try LayerDigest.compute(path: file(layer.file), wholeFile: true)
                if digest.size != layer.fileSize {
                    m.layers[i].damaged = "file is \(digest.size) bytes, the manifest said \(layer.fileSize)"
                } else if digest.fileSHA256 != layer.sha256 {
                    m.layers[i].damaged = "checksum mismatch: sha256 is \(digest.fileSHA256 ?? ""), the manifest said \(layer.sha256)"
                } else {
                    m.layers[i].record(digest, identity: identity)
                }
            } catch {
                m.layers[i].damaged = "cannot be read: \((error as? CodedError)?.description ?? "\(error)")"
            }
        }
        if var pending = m.pendingMerge, pending.chunks == nil, !pending.sha256.isEmpty {
            // A version 1 merge record holds a whole-file checksum: hash the merged file in chunks.
            let found = [pending.into, pending.file].compactMap { $0 }.lazy
                .compactMap { try? LayerDigest.compute(path: self.file($0), wholeFile: true) }
                .first { $0.0.fileSHA256 == pending.sha256 }
            if let (digest, identity) = found {
                pending.sha256 = digest.sha256
                pending.chunks = digest.chunks
                pending.identity = identity
                m.pendingMerge = pending
            } else {
                pending.sha256 = String(repeating: "0", count: 64)
                pending.chunks = []
                pending.fileSize = 0
                m.pendingMerge = pending
            }
        }
        m.version = BackupManifest.currentVersion
        return m
    }

    /// Why the chain cannot be extended, if it cannot: the cheap check of every layer the next
    /// incremental layer would depend on (the newest full layer and the layers after it) — a
    /// regular file with its recorded identity (inode, size, mtime) and backing link. No data is read.
    func brokenChain(_ m: BackupManifest) -> String? {
        guard let last = m.layers.indices.last else { return nil }
        for i in m.segmentStart(of: last)...last {
            let layer = m.layers[i]
            let what = "layer \(layer.index) (\(layer.file))"
            if let damaged = layer.damaged { return "\(what) is damaged: \(damaged)" }
            var st = stat()
            guard lstat(file(layer.file), &st) == 0 else { return "\(what) is missing" }
            guard st.st_mode & S_IFMT == S_IFREG else { return "\(what) is \(FileDevice.kind(st.st_mode)), not a regular file" }
            if let recorded = layer.identity, LayerDigest.identity(st) != recorded {
                return "\(what) changed since it was recorded (inode, size or modification time differ)"
            }
            let expected = layer.kind == .incremental && i > 0 ? m.layers[i - 1].file : nil
            do {
                let device = try RepositoryFiles(directory: path).openFile(file(layer.file), writable: false)
                defer { device.close() }
                let n = Int(min(UInt64(st.st_size), UInt64(max(m.clusterSize, 65536))))
                let header = try QCowHeader(decoding: try device.readBytes(n, at: 0, region: "header"))
                if header.backingFile != expected {
                    return "\(what) has backing file \(header.backingFile ?? "none"), the manifest says \(expected ?? "none")"
                }
            } catch let error as CodedError {
                return "\(what) cannot be read: \(error.description)"
            } catch {
                return "\(what) cannot be read: \(error)"
            }
        }
        return nil
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
        CivilTime(date).text("%Y%m%dT%H%M%SZ")
    }

    static func isoStamp(_ date: Date) -> String {
        CivilTime(date).text("%Y-%m-%dT%H:%M:%SZ")
    }

    /// A new random repository id (16 hex digits).
    public static func newID() -> String {
        var rng = SystemRandomNumberGenerator()
        return String(printf: "%016llx", rng.next() as UInt64)
    }
}
