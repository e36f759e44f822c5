import FoundationEssentials
import QCowImage
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// `LAYER.qcow2.json`, written beside each layer file before the manifest lists it: the
/// layer's record and the repository it belongs to, so `repair` can rebuild a lost manifest
/// exactly (indices, ids, bitmap, source) and a folder's layer files are known by their sidecars.
public struct LayerSidecar: Codable, Equatable, Sendable {
    public static let formatName = "qbackup-layer"
    public static let suffix = ".json"

    public var format: String
    public var version: Int
    public var repository: Repository
    public var layer: BackupManifest.Layer

    /// What a manifest says about its repository, but its layers and journal.
    public struct Repository: Codable, Equatable, Sendable {
        public var id: String
        public var clusterSize: Int
        public var source: BackupManifest.Source
        public var bitmap: String?
        public var replicaOf: String?
        public var group: BackupManifest.Group?

        enum CodingKeys: String, CodingKey {
            case id
            case clusterSize = "cluster-size"
            case source, bitmap
            case replicaOf = "replica-of"
            case group
        }
    }

    public init(manifest m: BackupManifest, layer: BackupManifest.Layer) {
        format = Self.formatName
        version = BackupManifest.currentVersion
        repository = Repository(id: m.id, clusterSize: m.clusterSize, source: m.source, bitmap: m.bitmap,
                                replicaOf: m.replicaOf, group: m.group)
        self.layer = layer
    }

    /// The sidecar's name for layer file `layer`.
    public static func fileName(of layer: String) -> String { layer + suffix }

    /// Whether `name` could be a sidecar (`X.qcow2.json`, X a plain name).
    static func isSidecarName(_ name: String) -> Bool {
        name.hasSuffix(".qcow2" + suffix) && name != BackupManifest.fileName
            && BackupManifest.isPlainFileName(String(name.dropLast(suffix.count)))
    }

    /// A repository with just this layer, validated as a manifest would be (a sidecar is untrusted input).
    func validate(path: String) throws {
        guard format == Self.formatName, version == BackupManifest.currentVersion else {
            throw ChainError(.invalidFormat, "sidecar: not a qbackup layer record of version \(BackupManifest.currentVersion)", path: path)
        }
        var m = BackupManifest(id: repository.id, virtualSize: layer.virtualSize, clusterSize: repository.clusterSize,
                               bitmap: repository.bitmap, source: repository.source)
        m.replicaOf = repository.replicaOf
        m.group = repository.group
        var only = layer
        only.kind = .full  // alone, it must pass as the first layer
        m.layers = [only]
        try m.validate(path: path)
        guard layer.damaged == nil else { throw ChainError(.invalidFormat, "sidecar: a damaged layer has no sidecar", path: path) }
    }

    /// Reads and validates the sidecar at `path` (a regular file, not through a symlink, bounded size).
    static func read(_ path: String) throws -> LayerSidecar {
        let device = FileDevice(adopting: FileDescriptor(rawValue: try RepositoryFiles.openRegular(path, flags: O_RDONLY)),
                                name: path, writable: false)
        defer { device.close() }
        let size = try device.size()
        guard size <= UInt64(BackupManifest.maxBytes) else {
            throw ChainError(.invalidFormat, "sidecar is \(size) bytes, more than the limit of \(BackupManifest.maxBytes)", path: path)
        }
        let bytes = try device.readBytes(Int(size), at: 0, region: "sidecar")
        let record: LayerSidecar
        do {
            record = try JSONDecoder().decode(LayerSidecar.self, from: Data(bytes))
        } catch let error as DecodingError {
            throw ChainError(.invalidFormat, "sidecar is not valid: \(BackupManifest.describe(error))", path: path)
        } catch {
            throw ChainError(.invalidFormat, "sidecar is not valid JSON", path: path)
        }
        try record.validate(path: path)
        return record
    }

    func encoded() throws -> Data { try BackupManifest.encoder.encode(self) }
}
