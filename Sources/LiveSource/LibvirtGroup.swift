import BackupChain
import FoundationEssentials
import Glibc
import QCowImage

/// Where a libvirt backup's checkpoints get their names: `qbackup-<group id>-<sequence>`.
///
/// One place for both layouts: the top folder DIR (`--repo`). When DIR is the repository of
/// one disk, DIR's manifest is that record — the group id is the repository's id and the
/// sequence its next layer index (as before several disks were possible: nothing changes for
/// those repositories). When DIR holds one repository per disk (DIR/vda, DIR/vdb), DIR has no
/// manifest; the record is `DIR/libvirt-group.json`, written (durably) before each job begins,
/// so no two jobs of the group ever make a checkpoint of the same name.
struct LibvirtGroup {
    /// The group's checkpoints are `qbackup-<id>-<sequence>`.
    var id: String
    /// The domain's UUID (a renamed domain is followed by it).
    var domainUUID: String?
    /// The sequence number of the group's next checkpoint.
    var sequence: Int

    static let fileName = BackupRepository.groupRecordName
    /// The record is a few dozen bytes; anything longer is not one.
    static let maxBytes = 4096

    var checkpointPrefix: String { "qbackup-\(id)-" }
    var nextCheckpoint: String { checkpointPrefix + String(sequence) }

    static func path(in top: String) -> String { "\(top)/\(fileName)" }

    /// The record in DIR (nil when there is none), validated before it is trusted.
    static func load(_ top: String) throws -> LibvirtGroup? {
        let file = Self.path(in: top)
        // Never through a symbolic link, and only a regular file (a FIFO could hang the read).
        var st = stat()
        guard lstat(file, &st) == 0 else {
            if errno == ENOENT { return nil }
            throw LiveError(.io, "\(file): cannot read: \(String(cString: strerror(errno)))")
        }
        guard st.st_mode & S_IFMT == S_IFREG else { throw LiveError(.invalidFormat, "\(file): not a regular file") }
        let device = try FileDevice(path: file, writable: false)
        defer { device.close() }
        let size = try device.size()
        guard size <= UInt64(maxBytes) else {
            throw LiveError(.invalidFormat, "\(file): \(size) bytes, more than a group record's limit of \(maxBytes)")
        }
        let bytes = try device.readBytes(Int(size), at: 0, region: "group record")
        let record: Record
        do {
            record = try JSONDecoder().decode(Record.self, from: Data(bytes))
        } catch {
            throw LiveError(.invalidFormat, "\(file): not a qbackup group record (\(error))")
        }
        guard record.version == 1 else {
            throw LiveError(.invalidFormat, "\(file): group record version \(record.version) is not supported (this qbackup reads version 1)")
        }
        guard !record.id.isEmpty, record.id.utf8.count <= 64,
              record.id.utf8.allSatisfy({ (48...57).contains($0) || (97...102).contains($0) }) else {
            throw LiveError(.invalidFormat, "\(file): group id '\(record.id)' is not 1 to 64 lower-case hex digits")
        }
        guard record.sequence >= 0, record.sequence < 1 << 40 else {
            throw LiveError(.invalidFormat, "\(file): sequence \(record.sequence) is out of range")
        }
        if let uuid = record.domainUUID, UUID(uuidString: uuid) == nil {
            throw LiveError(.invalidFormat, "\(file): domain-uuid '\(uuid)' is not a UUID")
        }
        return LibvirtGroup(id: record.id, domainUUID: record.domainUUID, sequence: record.sequence)
    }

    /// Replaces the record in DIR atomically and durably (temporary file, fsync, rename, folder fsync).
    func save(_ top: String) throws {
        let data = try JSONEncoder().encode(Record(version: 1, id: id, domainUUID: domainUUID, sequence: sequence))
        let output = try OutputFile(Self.path(in: top), overwrite: true, durable: true)
        try data.withUnsafeBytes { try output.device.write($0, at: 0) }
        try output.commit()
        output.device.close()
    }

    private struct Record: Codable {
        var version: Int
        var id: String
        var domainUUID: String?
        var sequence: Int

        enum CodingKeys: String, CodingKey {
            case version, id, sequence
            case domainUUID = "domain-uuid"
        }
    }
}
