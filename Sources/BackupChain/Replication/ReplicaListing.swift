import FoundationEssentials

/// What a destination holds, as `qbackup list --output json DIR` prints it (`send --have FILE`,
/// and what `replicate` reads from the other side): its id, the repository it is a replica
/// of, and its points by index and sha256. A folder that does not exist lists with no id and
/// no layers. Untrusted input: bounded, validated.
public struct ReplicaListing: Equatable, Sendable {
    public var id: String?
    public var replicaOf: String?
    public var points: [ReplicationStream.Point]

    public init(id: String?, replicaOf: String?, points: [ReplicationStream.Point]) {
        self.id = id
        self.replicaOf = replicaOf
        self.points = points
    }

    private struct Raw: Decodable {
        var id: String?
        var replicaOf: String?
        var layers: [ReplicationStream.Point]
        enum CodingKeys: String, CodingKey {
            case id
            case replicaOf = "replica-of"
            case layers
        }
    }

    /// Decodes and validates a listing (`what` names it in errors: a file, "the destination").
    public init(validating data: Data, what: String) throws {
        func bad(_ message: String) -> ChainError { ChainError(.invalidFormat, "\(what): \(message)") }
        guard data.count <= BackupManifest.maxBytes else { throw bad("more than \(BackupManifest.maxBytes) bytes") }
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
        }
        guard raw.id != nil || raw.layers.isEmpty else { throw bad("lists layers but no repository id") }
        self.init(id: raw.id, replicaOf: raw.replicaOf, points: raw.layers)
    }
}
