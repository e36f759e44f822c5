import Foundation
import QCowImage

/// `manifest.json` of a repository: which disk it backs up and its layers,
/// oldest first. An incremental layer's backing file is the layer before it
/// (by relative name); a full layer has none. Layer 0 is always full.
public struct BackupManifest: Codable, Equatable, Sendable {
    public static let formatName = "qbackup-repository"
    public static let currentVersion = 1
    public static let fileName = "manifest.json"
    /// Manifests larger than this are refused before parsing.
    public static let maxBytes = 64 << 20
    public static let maxLayers = 10_000

    public var format: String
    public var version: Int
    /// Random id of the repository; the default bitmap name derives from it.
    public var id: String
    /// Virtual size of the disk at the latest layer.
    public var virtualSize: UInt64
    /// Cluster size of the layers qbackup writes.
    public var clusterSize: Int
    /// The dirty bitmap in the source image that tracks changes since the latest layer.
    public var bitmap: String
    /// Absolute path of the source image when the repository was made.
    public var source: String
    public var layers: [Layer]
    /// A merge in progress (see `MergeEngine`): what the named file will hold once it completes.
    public var pendingMerge: PendingMerge?

    /// One backup layer.
    public struct Layer: Codable, Equatable, Sendable {
        public enum Kind: String, Codable, Sendable { case full, incremental }
        public var file: String
        public var kind: Kind
        /// ISO 8601 UTC time the backup was taken.
        public var created: String
        public var bytesCopied: UInt64
        public var fileSize: UInt64
        public var virtualSize: UInt64
        public var sha256: String

        enum CodingKeys: String, CodingKey {
            case file, kind, created
            case bytesCopied = "bytes-copied"
            case fileSize = "file-size"
            case virtualSize = "virtual-size"
            case sha256
        }
    }

    /// A merge that replaced `file` with a standalone layer of the same point in time.
    public struct PendingMerge: Codable, Equatable, Sendable {
        /// The file of layer `folded`, which the merged file replaces.
        public var file: String
        /// The merged file's SHA-256; empty while an in-place merge is still committing.
        public var sha256: String
        public var fileSize: UInt64
        /// How many layers (from index 0) the merged file replaces.
        public var folded: Int
        /// In-place merges: the full layer file the newer layers are committed into
        /// (then renamed to `file`). Absent when the merged file was written anew.
        public var into: String?
    }

    enum CodingKeys: String, CodingKey {
        case format, version, id
        case virtualSize = "virtual-size"
        case clusterSize = "cluster-size"
        case bitmap, source, layers
        case pendingMerge = "pending-merge"
    }

    public init(id: String, virtualSize: UInt64, clusterSize: Int, bitmap: String, source: String) {
        format = Self.formatName
        version = Self.currentVersion
        self.id = id
        self.virtualSize = virtualSize
        self.clusterSize = clusterSize
        self.bitmap = bitmap
        self.source = source
        layers = []
        pendingMerge = nil
    }

    /// Decodes and validates a manifest: known format and version, sane sizes,
    /// plain file names (no path separators), unique files, hex checksums.
    public init(validating data: Data, path: String) throws {
        guard data.count <= Self.maxBytes else {
            throw ChainError(.invalidFormat, "manifest is \(data.count) bytes, more than the limit of \(Self.maxBytes)", path: path)
        }
        let decoded: BackupManifest
        do {
            decoded = try JSONDecoder().decode(BackupManifest.self, from: data)
        } catch let error as DecodingError {
            throw ChainError(.invalidFormat, "manifest is not valid: \(Self.describe(error))", path: path)
        } catch {
            throw ChainError(.invalidFormat, "manifest is not valid JSON", path: path)
        }
        self = decoded
        try validate(path: path)
    }

    func validate(path: String) throws {
        func bad(_ message: String) -> ChainError { ChainError(.invalidFormat, "manifest: \(message)", path: path) }
        guard format == Self.formatName else { throw bad("format is '\(format)', expected '\(Self.formatName)'") }
        guard version == Self.currentVersion else {
            throw ChainError(.unsupported, "manifest version \(version) is not supported (this qbackup reads version \(Self.currentVersion))", path: path)
        }
        guard !id.isEmpty, id.count <= 64, id.allSatisfy({ $0.isHexDigit }) else { throw bad("id '\(id)' is not a hex string") }
        guard virtualSize <= QCowHeader.Limits.maxVirtualSize else { throw bad("virtual-size \(virtualSize) is too large") }
        guard clusterSize >= 512, clusterSize <= 2 << 20, clusterSize & (clusterSize - 1) == 0 else {
            throw bad("cluster-size \(clusterSize) is not a power of two from 512 to 2 MiB")
        }
        guard !bitmap.isEmpty, bitmap.utf8.count <= 1023 else { throw bad("bitmap name is empty or longer than 1023 bytes") }
        guard layers.count <= Self.maxLayers else { throw bad("\(layers.count) layers is more than \(Self.maxLayers)") }
        var seen = Set<String>()
        for (i, layer) in layers.enumerated() {
            guard Self.isPlainFileName(layer.file) else { throw bad("layer \(i) file '\(layer.file)' is not a plain file name") }
            guard seen.insert(layer.file).inserted else { throw bad("layer \(i) file '\(layer.file)' appears twice") }
            guard layer.sha256.count == 64, layer.sha256.allSatisfy({ $0.isHexDigit }) else {
                throw bad("layer \(i) sha256 is not 64 hex digits")
            }
            guard i > 0 || layer.kind == .full else { throw bad("layer 0 is \(layer.kind.rawValue), it must be full") }
            guard layer.virtualSize <= QCowHeader.Limits.maxVirtualSize else { throw bad("layer \(i) virtual-size is too large") }
        }
        if let pending = pendingMerge {
            guard Self.isPlainFileName(pending.file), pending.folded >= 1, pending.folded < layers.count,
                  layers[pending.folded].file == pending.file
            else { throw bad("pending-merge record is inconsistent") }
            let hashed = pending.sha256.count == 64 && pending.sha256.allSatisfy { $0.isHexDigit }
            if let into = pending.into {
                guard layers[segmentStart(of: pending.folded)].file == into, hashed || pending.sha256.isEmpty else {
                    throw bad("pending-merge record is inconsistent")
                }
            } else if !hashed {
                throw bad("pending-merge record is inconsistent")
            }
        }
    }

    /// The index of the full layer that layer `index`'s chain starts from.
    public func segmentStart(of index: Int) -> Int {
        var i = index
        while i > 0 && layers[i].kind != .full { i -= 1 }
        return i
    }

    static func isPlainFileName(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.count <= 255 && !name.contains("/") && name != "." && name != ".." && !name.hasPrefix(".")
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

    /// Pretty JSON with sorted keys.
    public func encoded() throws -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        return try encoder.encode(self)
    }
}
