import FoundationEssentials

/// What a destination holds, as `qbackup list --output json DIR` prints it (`send --have FILE`,
/// and what `replicate` reads from the other side): its id, the repository it is a replica
/// of, and its points by index and sha256 with their files' chunk digests (a fold after a merge
/// at the source sends only the chunks that differ; a listing without them gets whole files).
/// A folder that does not exist lists with no id and no layers. Untrusted input: bounded, validated.
public struct ReplicaListing: Equatable, Sendable {
    public var id: String?
    public var replicaOf: String?
    public var points: [ReplicationStream.Point]
    /// Each point's chunk digests (`chunks` of its record), when the listing has them.
    public var chunks: [[String]?]

    public init(id: String?, replicaOf: String?, points: [ReplicationStream.Point], chunks: [[String]?]? = nil) {
        self.id = id
        self.replicaOf = replicaOf
        self.points = points
        self.chunks = chunks ?? points.map { _ in nil }
    }

    /// What a manifest lists (a local destination).
    public init(_ m: BackupManifest) {
        self.init(id: m.id, replicaOf: m.replicaOf, points: m.layers.map(ReplicationStream.Point.init), chunks: m.layers.map(\.chunks))
    }

    private struct Raw: Decodable {
        var id: String?
        var replicaOf: String?
        var layers: [Layer]
        enum CodingKeys: String, CodingKey {
            case id
            case replicaOf = "replica-of"
            case layers
        }
    }

    /// The listing of the top folder of a libvirt backup of several disks (`{"disks": [...]}`).
    private struct GroupRaw: Decodable {
        var disks: [Disk]
        struct Disk: Decodable { var disk: String }
    }

    private struct Layer: Decodable {
        var index: Int
        var sha256: String
        var chunkSize: Int?
        var chunks: [String]?
        enum CodingKeys: String, CodingKey {
            case index, sha256
            case chunkSize = "chunk-size"
            case chunks
        }
    }

    /// Decodes and validates a listing (`what` names it in errors: a file, "the destination").
    public init(validating data: Data, what: String) throws {
        func bad(_ message: String) -> ChainError { ChainError(.invalidFormat, "\(what): \(message)") }
        guard data.count <= Self.maxBytes else { throw bad("more than \(Self.maxBytes) bytes") }
        // A group's top folder is no repository: one of its disks' is meant.
        if let group = try? JSONDecoder().decode(GroupRaw.self, from: data) {
            let names = group.disks.prefix(16).map { String($0.disk.prefix(64)) }
            throw ChainError(.invalidArgument, "\(what): the folder holds the repositories of several disks (\(names.joined(separator: ", "))); name one of them")
        }
        let raw: Raw
        do {
            raw = try JSONDecoder().decode(Raw.self, from: data)
        } catch let error as DecodingError {
            throw bad("not a 'qbackup list --output json' listing: \(BackupManifest.describe(error))")
        } catch {
            throw bad("not valid JSON")
        }
        if let id = raw.id, !BackupManifest.isHexID(id) { throw bad("id is not a hex string") }
        if let of = raw.replicaOf, !BackupManifest.isHexID(of) { throw bad("replica-of is not a hex string") }
        guard raw.layers.count <= BackupManifest.maxLayers else { throw bad("more than \(BackupManifest.maxLayers) layers") }
        for (i, point) in raw.layers.enumerated() {
            guard BackupManifest.isDigest(point.sha256), point.index >= 0, point.index < 1 << 40,
                  i == 0 || point.index > raw.layers[i - 1].index
            else { throw bad("layer \(i) has no valid index and sha256, or is out of order") }
            if let chunks = point.chunks {
                guard point.chunkSize == BackupManifest.chunkSize, chunks.count <= BackupManifest.maxChunks,
                      chunks.allSatisfy(BackupManifest.isDigest), LayerDigest.combine(chunks) == point.sha256
                else { throw bad("layer \(i) has chunk digests that are not those of its sha256") }
            }
        }
        guard raw.id != nil || raw.layers.isEmpty else { throw bad("lists layers but no repository id") }
        self.init(id: raw.id, replicaOf: raw.replicaOf, points: raw.layers.map { ReplicationStream.Point(index: $0.index, sha256: $0.sha256) },
                  chunks: raw.layers.map(\.chunks))
    }

    /// The listing's limit: a manifest's, and room for the list command's indentation.
    public static let maxBytes = 2 * BackupManifest.maxBytes
}
