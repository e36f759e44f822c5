import FoundationEssentials
import QCowImage

/// `manifest.json` of a repository (version 2, DESIGN.md "The manifest"): which disk it
/// backs up, its layers oldest first, and the journal of files qbackup is about to create
/// (or has just let go of). An incremental layer's backing file is the layer before it (by
/// relative name); a full layer has none. The first layer is always full.
///
/// Version 1 manifests are read (`BackupManifestV1`) into this model with `version` 1 and
/// layers that carry no chunks or identity; `BackupRepository.upgraded()` hashes their files
/// before the first write turns them into version 2.
public struct BackupManifest: Codable, Equatable, Sendable {
    public static let formatName = "qbackup-repository"
    public static let currentVersion = 2
    public static let fileName = "manifest.json"
    /// Manifests larger than this are refused before parsing.
    public static let maxBytes = 64 << 20
    public static let maxLayers = 10_000
    public static let maxJournal = 1_000
    /// Layer files are hashed in chunks of this size (`chunks`); fixed.
    public static let chunkSize = 4 << 20
    /// A layer file of at most 16 TiB (4 Mi chunks).
    public static let maxChunks = 1 << 22

    public var format: String
    /// 2, or 1 for a manifest read from a version 1 file (not yet upgraded).
    public var version: Int
    /// Random id of the repository; the default bitmap name derives from it.
    public var id: String
    /// Virtual size of the disk at the latest layer.
    public var virtualSize: UInt64
    /// Cluster size of the layers qbackup writes.
    public var clusterSize: Int
    public var source: Source
    /// The dirty bitmap in the source image that tracks changes since the latest layer
    /// (file and QMP sources; nil for libvirt, which tracks with checkpoints).
    public var bitmap: String?
    /// On a replica: the id of the repository it copies.
    public var replicaOf: String?
    /// Multi-disk libvirt backups: the group the repository belongs to.
    public var group: Group?
    /// Files that qbackup is about to create in the folder, or has let go of, and a merge in
    /// progress. Every file named here that no layer claims is removed by the next run.
    public var journal: [JournalEntry]
    public var layers: [Layer]

    /// Where the disk comes from.
    public struct Source: Codable, Equatable, Sendable {
        public enum Kind: String, Codable, Sendable { case file, libvirt, nbd }
        public var kind: Kind
        /// kind file: the absolute path of the image.
        public var path: String?
        /// kind libvirt: the domain's UUID, the disk's target (`vda`) and the connection URI.
        public var domainUUID: String?
        public var disk: String?
        public var uri: String?
        /// kind nbd: the export URI is `uri`; `name` a `--source-name` given instead (or as well).
        public var name: String?

        public init(kind: Kind, path: String? = nil, domainUUID: String? = nil, disk: String? = nil, uri: String? = nil,
                    name: String? = nil) {
            self.kind = kind
            self.path = path
            self.domainUUID = domainUUID
            self.disk = disk
            self.uri = uri
            self.name = name
        }

        public static func file(_ path: String) -> Source { Source(kind: .file, path: path) }

        /// A local image, by the absolute, symlink-free path that identifies it in the manifest.
        public static func localFile(_ path: String) -> Source {
            .file(URL(fileURLWithPath: path).standardizedFileURL.resolvingSymlinksInPath().path)
        }

        /// One line for people: the path, `libvirt UUID/vda`, or the NBD URI or name.
        public var summary: String {
            switch kind {
            case .file: return path ?? ""
            case .libvirt: return "libvirt \(domainUUID ?? "")/\(disk ?? "")"
            case .nbd: return "nbd \(uri ?? name ?? "")"
            }
        }

        enum CodingKeys: String, CodingKey {
            case kind, path
            case domainUUID = "domain-uuid"
            case disk, uri, name
        }
    }

    /// A multi-disk backup's group: its id and this disk's place in it.
    public struct Group: Codable, Equatable, Sendable {
        public var id: String
        public var sequence: Int
    }

    /// The identity of a layer file when it was recorded: a cheap "changed since?" check.
    /// (Not ctime: a hard link, as `cp -al` makes, changes it.)
    public struct Identity: Codable, Equatable, Sendable {
        public var inode: UInt64
        public var size: UInt64
        /// Modification time, nanoseconds since the epoch.
        public var mtime: Int64
        public init(inode: UInt64, size: UInt64, mtime: Int64) {
            self.inode = inode
            self.size = size
            self.mtime = mtime
        }
    }

    /// How a layer's data was read.
    public enum Mode: String, Codable, Sendable { case offline, qmp, libvirt, nbd }

    /// One backup layer.
    public struct Layer: Codable, Equatable, Sendable {
        public enum Kind: String, Codable, Sendable { case full, incremental }
        /// The point's index: stable for life (a merge never renumbers), never reused.
        public var index: Int
        public var file: String
        public var kind: Kind
        public var mode: Mode
        /// ISO 8601 UTC time the backup was taken.
        public var created: String
        public var bytesCopied: UInt64
        public var fileSize: UInt64
        public var virtualSize: UInt64
        /// SHA-256 of the ordered chunk digests (their 32-byte values one after another);
        /// in a version 1 manifest, of the whole file.
        public var sha256: String
        /// `BackupManifest.chunkSize`; nil only for a layer not (yet) upgraded from version 1.
        public var chunkSize: Int?
        /// SHA-256 of each `chunkSize` piece of the file, in order.
        public var chunks: [String]?
        public var identity: Identity?
        /// libvirt: the checkpoint the layer's changes are tracked since.
        public var checkpoint: String?
        /// Set when the file failed its check as a version 1 manifest was upgraded (the reason):
        /// its chunks are unknown, so the chain ends before it for every new backup.
        public var damaged: String?

        public init(index: Int, file: String, kind: Kind, mode: Mode = .offline, created: String, bytesCopied: UInt64,
                    fileSize: UInt64, virtualSize: UInt64, digest: LayerDigest, identity: Identity?,
                    checkpoint: String? = nil) {
            self.index = index
            self.file = file
            self.kind = kind
            self.mode = mode
            self.created = created
            self.bytesCopied = bytesCopied
            self.fileSize = fileSize
            self.virtualSize = virtualSize
            sha256 = digest.sha256
            chunkSize = BackupManifest.chunkSize
            chunks = digest.chunks
            self.identity = identity
            self.checkpoint = checkpoint
            damaged = nil
        }

        /// Records what a fresh hash of the file found (and where the file is now).
        public mutating func record(_ digest: LayerDigest, identity: Identity?) {
            sha256 = digest.sha256
            fileSize = digest.size
            chunkSize = BackupManifest.chunkSize
            chunks = digest.chunks
            self.identity = identity
            damaged = nil
        }

        enum CodingKeys: String, CodingKey {
            case index, file, kind, mode, created
            case bytesCopied = "bytes-copied"
            case fileSize = "file-size"
            case virtualSize = "virtual-size"
            case sha256
            case chunkSize = "chunk-size"
            case chunks, identity, checkpoint, damaged
        }
    }

    /// One journal record: a file name qbackup owns but no layer claims, a merge in progress,
    /// or (on a replica) a fold received from the source that is being switched in.
    public struct JournalEntry: Codable, Equatable, Sendable {
        /// A plain file name inside the folder.
        public var file: String?
        public var merge: PendingMerge?
        public var fold: ReceivedFold?
        public init(file: String) {
            self.file = file
        }
        public init(merge: PendingMerge) {
            self.merge = merge
        }
        public init(fold: ReceivedFold) {
            self.fold = fold
        }
    }

    /// A merge that replaced `file` with a standalone layer of the same point in time.
    public struct PendingMerge: Codable, Equatable, Sendable {
        /// The file of the layer at position `folded`, which the merged file replaces.
        public var file: String
        /// The merged file's digest (as a layer's `sha256`); empty while an in-place merge is still committing.
        public var sha256: String
        public var fileSize: UInt64
        /// The position of the layer the merged file replaces; the layers from `from` up to it go.
        public var folded: Int
        /// The position of the oldest layer that goes (absent: 0, the oldest layer of all).
        /// A later position is a retention fold in the middle of the chain.
        public var from: Int?
        /// In-place merges: the full layer file the newer layers are committed into
        /// (then renamed to `file`). Absent when the merged file was written anew.
        public var into: String?
        /// The merged file's chunk digests and identity, once known.
        public var chunks: [String]?
        public var identity: Identity?

        public init(file: String, sha256: String, fileSize: UInt64, folded: Int, from: Int? = nil, into: String? = nil,
                    chunks: [String]? = nil, identity: Identity? = nil) {
            self.file = file
            self.sha256 = sha256
            self.fileSize = fileSize
            self.folded = folded
            self.from = from
            self.into = into
            self.chunks = chunks
            self.identity = identity
        }

        enum CodingKeys: String, CodingKey {
            case file, sha256
            case fileSize = "file-size"
            case folded, from, into, chunks, identity
        }

        /// The position of the oldest layer that goes.
        public var start: Int { from ?? 0 }
    }

    enum CodingKeys: String, CodingKey {
        case format, version, id
        case virtualSize = "virtual-size"
        case clusterSize = "cluster-size"
        case source, bitmap
        case replicaOf = "replica-of"
        case group, journal, layers
    }

    public init(id: String, virtualSize: UInt64, clusterSize: Int, bitmap: String?, source: Source) {
        format = Self.formatName
        version = Self.currentVersion
        self.id = id
        self.virtualSize = virtualSize
        self.clusterSize = clusterSize
        self.bitmap = bitmap
        self.source = source
        replicaOf = nil
        group = nil
        journal = []
        layers = []
    }

    /// The merge in progress (the journal's merge record), if any.
    public var pendingMerge: PendingMerge? {
        get { journal.lazy.compactMap(\.merge).first }
        set {
            journal.removeAll { $0.merge != nil }
            if let newValue { journal.append(JournalEntry(merge: newValue)) }
        }
    }

    /// The received fold being switched in (the journal's fold record), if any.
    public var receivedFold: ReceivedFold? {
        get { journal.lazy.compactMap(\.fold).first }
        set {
            journal.removeAll { $0.fold != nil }
            if let newValue { journal.append(JournalEntry(fold: newValue)) }
        }
    }

    /// The file names the journal holds.
    public var journalFiles: [String] { journal.compactMap(\.file) }

    /// The index the next layer gets: one past the newest ever recorded.
    public var nextIndex: Int { (layers.last?.index ?? -1) + 1 }

    /// The position in `layers` of the layer with index `index`.
    public func position(ofIndex index: Int) -> Int? {
        layers.firstIndex { $0.index == index }
    }

    /// Decodes and validates a manifest of version 1 or 2: known format and version, sane
    /// sizes, plain file names, unique files, hex digests, strictly increasing indices,
    /// chunk lists that fit the file sizes and digests.
    public init(validating data: Data, path: String) throws {
        guard data.count <= Self.maxBytes else {
            throw ChainError(.invalidFormat, "manifest is \(data.count) bytes, more than the limit of \(Self.maxBytes)", path: path)
        }
        struct Probe: Decodable { var format: String?; var version: Int? }
        do {
            let probe = try JSONDecoder().decode(Probe.self, from: data)
            if let format = probe.format, format != Self.formatName {
                throw ChainError(.invalidFormat, "manifest: format is '\(format)', expected '\(Self.formatName)'", path: path)
            }
            switch probe.version {
            case 1: self = try JSONDecoder().decode(BackupManifestV1.self, from: data).upgradedModel()
            case 2: self = try JSONDecoder().decode(BackupManifest.self, from: data)
            case let v?:
                throw ChainError(.unsupported, "manifest version \(v) is not supported (this qbackup reads versions 1 and 2)",
                                 path: path)
            case nil: throw ChainError(.invalidFormat, "manifest is not valid: missing key 'version'", path: path)
            }
        } catch let error as DecodingError {
            throw ChainError(.invalidFormat, "manifest is not valid: \(Self.describe(error))", path: path)
        } catch let error as ChainError {
            throw error
        } catch {
            throw ChainError(.invalidFormat, "manifest is not valid JSON", path: path)
        }
        try validate(path: path)
    }

    func validate(path: String) throws {
        func bad(_ message: String) -> ChainError { ChainError(.invalidFormat, "manifest: \(message)", path: path) }
        guard format == Self.formatName else { throw bad("format is '\(format)', expected '\(Self.formatName)'") }
        guard version == 1 || version == Self.currentVersion else {
            throw ChainError(.unsupported, "manifest version \(version) is not supported (this qbackup reads versions 1 and 2)",
                             path: path)
        }
        guard Self.isHexID(id) else { throw bad("id '\(id)' is not a hex string of at most 64 digits") }
        guard virtualSize <= QCowHeader.Limits.maxVirtualSize else { throw bad("virtual-size \(virtualSize) is too large") }
        guard clusterSize >= 512, clusterSize <= 2 << 20, clusterSize & (clusterSize - 1) == 0 else {
            throw bad("cluster-size \(clusterSize) is not a power of two from 512 to 2 MiB")
        }
        try Self.validate(source, bad)
        if let bitmap {
            guard !bitmap.isEmpty, bitmap.utf8.count <= 1023 else { throw bad("bitmap name is empty or longer than 1023 bytes") }
        } else if source.kind == .file {
            throw bad("a repository of a file source needs a bitmap")
        }
        if let replicaOf, !Self.isHexID(replicaOf) { throw bad("replica-of '\(replicaOf)' is not a hex string") }
        if let group {
            guard Self.isHexID(group.id), group.sequence >= 0, group.sequence < 1 << 16 else { throw bad("group is not valid") }
        }
        guard layers.count <= Self.maxLayers else { throw bad("\(layers.count) layers is more than \(Self.maxLayers)") }
        var seen = Set<String>()
        for (i, layer) in layers.enumerated() {
            try validate(layer, at: i, bad)
            guard seen.insert(layer.file).inserted else { throw bad("layer \(i) file '\(layer.file)' appears twice") }
            guard i == 0 || layer.index > layers[i - 1].index else {
                throw bad("layer \(i) index \(layer.index) does not follow \(layers[i - 1].index)")
            }
        }
        guard journal.count <= Self.maxJournal else { throw bad("journal holds \(journal.count) entries, more than \(Self.maxJournal)") }
        for entry in journal {
            guard [entry.file != nil, entry.merge != nil, entry.fold != nil].filter({ $0 }).count == 1 else {
                throw bad("a journal entry names none or more than one of a file, a merge and a fold")
            }
            if let file = entry.file, !Self.isPlainFileName(file) { throw bad("journal file '\(file)' is not a plain file name") }
        }
        guard journal.filter({ $0.merge != nil }).count <= 1 else { throw bad("journal holds two merges") }
        if let pending = pendingMerge { try validate(pending, bad) }
        guard journal.filter({ $0.fold != nil }).count <= 1, receivedFold == nil || pendingMerge == nil else {
            throw bad("journal holds more than one merge or received fold")
        }
        if let fold = receivedFold { try fold.validate(in: self, bad) }
    }

    func validate(_ layer: Layer, at i: Int, _ bad: (String) -> ChainError) throws {
        guard Self.isPlainFileName(layer.file) else { throw bad("layer \(i) file '\(layer.file)' is not a plain file name") }
        guard layer.index >= 0, layer.index < 1 << 40 else { throw bad("layer \(i) index \(layer.index) is out of range") }
        guard Self.isDigest(layer.sha256) else { throw bad("layer \(i) sha256 is not 64 hex digits") }
        guard i > 0 || layer.kind == .full else { throw bad("layer 0 is \(layer.kind.rawValue), it must be full") }
        guard layer.virtualSize <= QCowHeader.Limits.maxVirtualSize else { throw bad("layer \(i) virtual-size is too large") }
        guard layer.fileSize <= UInt64(Self.maxChunks) * UInt64(Self.chunkSize) else { throw bad("layer \(i) file-size is too large") }
        guard layer.created.utf8.count <= 64, !layer.created.isEmpty else { throw bad("layer \(i) created is not a time") }
        if let checkpoint = layer.checkpoint, !Self.isPlainText(checkpoint, max: 1023) {
            throw bad("layer \(i) checkpoint name is not valid")
        }
        if let damaged = layer.damaged {
            guard Self.isPlainText(damaged, max: 4096), version == Self.currentVersion else { throw bad("layer \(i) damaged is not valid") }
        }
        guard version == Self.currentVersion, layer.damaged == nil else {
            guard layer.chunks == nil, layer.chunkSize == nil, layer.identity == nil else {
                throw bad("layer \(i) carries chunks though it was never hashed in chunks")
            }
            return
        }
        guard layer.chunkSize == Self.chunkSize, let chunks = layer.chunks, layer.identity != nil else {
            throw bad("layer \(i) lacks chunk-size \(Self.chunkSize), chunks or identity")
        }
        guard chunks.count == LayerDigest.chunkCount(of: layer.fileSize) else {
            throw bad("layer \(i) has \(chunks.count) chunk digests, its file-size \(layer.fileSize) needs \(LayerDigest.chunkCount(of: layer.fileSize))")
        }
        guard chunks.allSatisfy(Self.isDigest) else { throw bad("layer \(i) has a chunk digest that is not 64 hex digits") }
        guard LayerDigest.combine(chunks) == layer.sha256 else { throw bad("layer \(i) sha256 is not the digest of its chunks") }
        guard layer.identity?.size == layer.fileSize else { throw bad("layer \(i) identity size differs from file-size") }
    }

    private func validate(_ pending: PendingMerge, _ bad: (String) -> ChainError) throws {
        func inconsistent() -> ChainError { bad("pending merge record is inconsistent") }
        guard Self.isPlainFileName(pending.file), pending.folded >= 1, pending.folded < layers.count,
              layers[pending.folded].file == pending.file, pending.start >= 0, pending.start < pending.folded
        else { throw inconsistent() }
        let hashed = Self.isDigest(pending.sha256)
        if let into = pending.into {
            guard layers[max(pending.start, segmentStart(of: pending.folded))].file == into, hashed || pending.sha256.isEmpty else {
                throw inconsistent()
            }
        } else if !hashed {
            throw inconsistent()
        }
        if let chunks = pending.chunks {
            guard chunks.count == LayerDigest.chunkCount(of: pending.fileSize), chunks.allSatisfy(Self.isDigest),
                  LayerDigest.combine(chunks) == pending.sha256
            else { throw inconsistent() }
        } else if version == Self.currentVersion && !pending.sha256.isEmpty {
            throw inconsistent()
        }
    }

    static func validate(_ source: Source, _ bad: (String) -> ChainError) throws {
        func text(_ value: String?, _ what: String, max: Int = 4096) throws {
            if let value, !isPlainText(value, max: max) { throw bad("source \(what) is not valid") }
        }
        try text(source.path, "path")
        try text(source.domainUUID, "domain-uuid", max: 36)
        try text(source.disk, "disk", max: 255)
        try text(source.uri, "uri")
        try text(source.name, "name", max: 1023)
        switch source.kind {
        case .file:
            guard let path = source.path, path.hasPrefix("/") else { throw bad("source of kind file needs an absolute path") }
        case .libvirt:
            guard let uuid = source.domainUUID, UUID(uuidString: uuid) != nil, source.disk != nil, source.uri != nil else {
                throw bad("source of kind libvirt needs domain-uuid, disk and uri")
            }
        case .nbd:
            guard source.uri != nil || source.name != nil else { throw bad("source of kind nbd needs a uri or a name") }
        }
    }

    /// The position of the full layer that the layer at position `index`'s chain starts from.
    public func segmentStart(of index: Int) -> Int {
        var i = index
        while i > 0 && layers[i].kind != .full { i -= 1 }
        return i
    }

    static func isPlainFileName(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.count <= 255 && !name.contains("/") && name != "." && name != ".." && !name.hasPrefix(".")
            && !name.unicodeScalars.contains { $0.value < 0x20 || $0.value == 0x7f }
    }

    static func isPlainText(_ text: String, max: Int) -> Bool {
        !text.isEmpty && text.utf8.count <= max && !text.unicodeScalars.contains { $0.value < 0x20 || $0.value == 0x7f }
    }

    static func isHexID(_ text: String) -> Bool {
        !text.isEmpty && text.utf8.count <= 64 && text.utf8.allSatisfy { isHex($0) }
    }

    /// 64 lowercase hex digits (as qbackup writes them; a version 1 record is lowercased on reading).
    static func isDigest(_ text: String) -> Bool {
        text.utf8.count == 64 && text.utf8.allSatisfy { ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x61 && $0 <= 0x66) }
    }

    private static func isHex(_ c: UInt8) -> Bool {
        (c >= 0x30 && c <= 0x39) || (c >= 0x61 && c <= 0x66) || (c >= 0x41 && c <= 0x46)
    }

    static func describe(_ error: DecodingError) -> String {
        switch error {
        case .keyNotFound(let key, let ctx): return "missing key '\(key.stringValue)'\(where_(ctx))"
        case .typeMismatch(_, let ctx), .valueNotFound(_, let ctx): return "wrong type\(where_(ctx))"
        case .dataCorrupted(let ctx): return "\(ctx.debugDescription)\(where_(ctx))"
        @unknown default: return "\(error)"
        }
    }

    private static func where_(_ ctx: DecodingError.Context) -> String {
        let path = ctx.codingPath.map { $0.intValue.map { "[\($0)]" } ?? ".\($0.stringValue)" }.joined()
        return path.isEmpty ? "" : " at \(path)"
    }

    /// Pretty JSON with sorted keys, always version 2.
    public func encoded() throws -> Data {
        var v2 = self
        v2.version = Self.currentVersion
        return try Self.encoder.encode(v2)
    }

    static var encoder: JSONEncoder {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        return encoder
    }
}

/// A version 1 manifest exactly as it was written (read only).
struct BackupManifestV1: Decodable {
    var format: String
    var version: Int
    var id: String
    var virtualSize: UInt64
    var clusterSize: Int
    var bitmap: String
    var source: String
    var layers: [Layer]
    var pendingMerge: PendingMerge?

    struct Layer: Decodable {
        var file: String
        var kind: BackupManifest.Layer.Kind
        var created: String
        var bytesCopied: UInt64
        var fileSize: UInt64
        var virtualSize: UInt64
        var sha256: String
        enum CodingKeys: String, CodingKey {
            case file, kind, created
            case bytesCopied = "bytes-copied"
            case fileSize = "file-size"
            case virtualSize = "virtual-size"
            case sha256
        }
    }

    struct PendingMerge: Decodable {
        var file: String
        var sha256: String
        var fileSize: UInt64
        var folded: Int
        var into: String?
    }

    enum CodingKeys: String, CodingKey {
        case format, version, id
        case virtualSize = "virtual-size"
        case clusterSize = "cluster-size"
        case bitmap, source, layers
        case pendingMerge = "pending-merge"
    }

    /// The version 2 model of it: indices by position, mode offline, no chunks yet.
    func upgradedModel() -> BackupManifest {
        var m = BackupManifest(id: id, virtualSize: virtualSize, clusterSize: clusterSize, bitmap: bitmap,
                               source: .file(source))
        m.format = format
        m.version = 1
        m.layers = layers.enumerated().map { i, l in
            var layer = BackupManifest.Layer(index: i, file: l.file, kind: l.kind, created: l.created, bytesCopied: l.bytesCopied,
                                             fileSize: l.fileSize, virtualSize: l.virtualSize,
                                             digest: LayerDigest(chunks: [], sha256: l.sha256.lowercased(), size: l.fileSize), identity: nil)
            layer.chunkSize = nil
            layer.chunks = nil
            return layer
        }
        if let p = pendingMerge {
            m.pendingMerge = BackupManifest.PendingMerge(file: p.file, sha256: p.sha256.lowercased(), fileSize: p.fileSize, folded: p.folded,
                                                         into: p.into)
        }
        return m
    }
}
