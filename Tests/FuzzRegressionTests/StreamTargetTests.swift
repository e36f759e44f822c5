import BackupChain
import Foundation
import FuzzTargets
import Testing
import TestSupport

/// The `stream` fuzz target's seed is a real stream: received, it is a replica of three layers
/// that verifies, so the target reaches the receiver's whole path (not only its refusals).
@Suite struct StreamTargetTests {
    @Test func theSeedStreamMakesAReplicaThatVerifies() throws {
        let seed = FuzzRegressionTests.root.appendingPathComponent("stream/qbackup-made-three-layers")
        let bytes = [UInt8](try Data(contentsOf: seed))
        let dir = TempDir()
        let result = try ReplicationReceiver.receive(repository: dir.file("replica"), from: MemoryStream(bytes))
        #expect(result.layers.count == 3)
        #expect(try ChainVerifier.verify(repository: dir.file("replica")).ok)
        // Cut inside its first layer: refused, nothing left.
        let cut = dir.file("cut")
        #expect(throws: ChainError.self) { try ReplicationReceiver.receive(repository: cut, from: MemoryStream(Array(bytes.prefix(600)))) }
        #expect(!FileManager.default.fileExists(atPath: cut))
    }

    /// The fold seed: a whole stream, then the stream a merge at the source makes for that replica
    /// (version 2, a fold record). Received one after the other, as the target does, the replica
    /// holds the merged source's two points and verifies; the second stream alone into a fresh
    /// folder is refused with nothing left.
    @Test func theFoldSeedFoldsTheReplica() throws {
        let seed = FuzzRegressionTests.root.appendingPathComponent("stream/qbackup-made-three-layers-then-fold")
        let bytes = [UInt8](try Data(contentsOf: seed))
        let dir = TempDir()
        let length = ReplicationStream.firstStreamLength(in: bytes)
        #expect(length < bytes.count)
        let secondStream = Array(bytes[length...])
        let first = try ReplicationReceiver.receive(repository: dir.file("replica"), from: MemoryStream(Array(bytes[..<length])))
        #expect(first.layers.count == 3)
        let second = try ReplicationReceiver.receive(repository: dir.file("replica"), from: MemoryStream(secondStream))
        #expect(second.layers.count == 1)
        let repo = try BackupRepository(path: dir.file("replica"), exclusive: false)
        #expect(repo.manifest?.layers.map(\.kind) == [.full, .incremental])
        #expect(try ChainVerifier.verify(repository: dir.file("replica")).ok)
        let fresh = dir.file("fresh")
        #expect(throws: ChainError.self) { try ReplicationReceiver.receive(repository: fresh, from: MemoryStream(secondStream)) }
        #expect(!FileManager.default.fileExists(atPath: fresh))
    }
}
