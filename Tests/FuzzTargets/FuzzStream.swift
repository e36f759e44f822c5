import BackupChain
import Foundation

extension FuzzTargets {
    /// Replication streams from bytes, received by the real receiver into a fresh folder (on
    /// /dev/shm when there is one: fsync is free there), one after another while they are
    /// received whole (at most 3: a whole stream, then what a merge at the source sends, so fold
    /// records are received into a real replica). Whatever the bytes, the folder then holds
    /// nothing, or a replica whose every recorded layer verifies (checksums, qcow2 check, backing
    /// links), with no temporary file left behind.
    public static func stream(_ data: UnsafeRawBufferPointer) {
        let base = FileManager.default.fileExists(atPath: "/dev/shm") ? "/dev/shm" : NSTemporaryDirectory()
        let dir = "\(base)/qbackup-fuzz-stream-\(getpid())"
        let dst = dir + "/replica"
        try? FileManager.default.removeItem(atPath: dir)
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var rest = Array(data)
        for _ in 0..<3 {
            let length = ReplicationStream.firstStreamLength(in: rest)
            let received = (try? ReplicationReceiver.receive(repository: dst, from: MemoryStream(Array(rest[..<length])))) != nil
            rest.removeFirst(length)
            guard received, !rest.isEmpty else { break }
        }
        let names = (try? FileManager.default.contentsOfDirectory(atPath: dst)) ?? []
        expect(!names.contains { $0.hasSuffix(".partial") || $0.hasSuffix(".tmp") }, "a temporary file is left: \(names)")
        guard names.contains(BackupManifest.fileName) else {
            expect(names.allSatisfy { $0 == ".qbackup.lock" }, "files without a manifest: \(names)")
            return
        }
        do {
            let report = try ChainVerifier.verify(repository: dst)
            expect(report.ok, "a received replica does not verify: \(report.problems)")
        } catch {
            // A replica with no layer (a stream of none) holds no backup to verify.
            expect("\(error)".contains("holds no backup"), "a received replica cannot be verified: \(error)")
        }
    }
}
