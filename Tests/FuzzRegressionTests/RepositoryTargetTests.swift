import BackupChain
import Foundation
import FuzzTargets
import QCowImage
import Testing

/// The repository fuzz target verifies from memory: its kept seeds (repositories qbackup
/// made, packed by scripts/fuzz-corpus.sh: one with a version 1 manifest, one with version 2
/// and sidecars) unpack, verify clean and open every point; a flipped byte in any layer
/// makes the same in-memory verify fail.
@Suite struct RepositoryTargetTests {
    static let seeds = ["qbackup-made-three-layers", "qbackup-made-three-layers-v2"]

    static func unpack(_ seed: String) throws -> (BackupManifest, [String: [UInt8]]) {
        let bytes = try Data(contentsOf: FuzzRegressionTests.root.appendingPathComponent("repository/\(seed)"))
        let files = try #require(bytes.withUnsafeBytes { FuzzTargets.unpackRepository($0) })
        let manifestBytes = try #require(files[BackupManifest.fileName])
        let manifest = try BackupManifest(validating: Data(manifestBytes), path: "manifest.json")
        return (manifest, files)
    }

    static func verify(_ manifest: BackupManifest, _ files: [String: [UInt8]]) -> ChainVerifier.Report {
        var report = ChainVerifier.Report()
        ChainVerifier.verifyLayers(of: manifest, in: FuzzTargets.repositoryFolder, files: FuzzTargets.repositoryFiles(files),
                                   report: &report)
        return report
    }

    @Test(arguments: seeds) func seedVerifiesAndEveryPointOpens(_ seed: String) throws {
        let (manifest, files) = try Self.unpack(seed)
        #expect(manifest.version == (seed.hasSuffix("v2") ? 2 : 1))
        #expect(manifest.layers.count == 3)
        let report = Self.verify(manifest, files)
        #expect(report.ok, "\(report.problems)")
        #expect(report.layersChecked == 3)
        let memory = FuzzTargets.repositoryFiles(files)
        for index in manifest.layers.indices {
            let image = try RestoreEngine.openPoint(FuzzTargets.repositoryFolder, manifest, index: index, files: memory)
            #expect(image.chain.count == index + 1)
            image.close()
        }
    }

    @Test(arguments: seeds) func aFlippedByteInAnyLayerFailsVerify(_ seed: String) throws {
        let (manifest, files) = try Self.unpack(seed)
        for layer in manifest.layers {
            var damaged = files
            damaged[layer.file]![damaged[layer.file]!.count / 2] ^= 0x40
            let report = Self.verify(manifest, damaged)
            #expect(!report.ok)
            #expect(report.problems.contains { $0.kind == .checksum && $0.file == layer.file && $0.layer == layer.index },
                    "\(report.problems)")
        }
    }
}
