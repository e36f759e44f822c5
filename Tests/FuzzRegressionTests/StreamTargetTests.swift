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
}
