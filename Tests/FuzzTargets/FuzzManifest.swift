import BackupChain
import Foundation

extension FuzzTargets {
    /// Parses a repository manifest (version 1 or 2); a version 2 one that validates survives
    /// encode/decode unchanged, a version 1 one reads as layers not yet hashed in chunks.
    public static func manifest(_ data: UnsafeRawBufferPointer) {
        let path = "<fuzz>/manifest.json"
        guard let manifest = try? BackupManifest(validating: Data(data), path: path) else { return }
        for i in manifest.layers.indices {
            let start = manifest.segmentStart(of: i)
            expect(start <= i && manifest.layers[start].kind == .full, "segment of layer \(i) starts at \(start)")
        }
        for (i, layer) in manifest.layers.enumerated() {
            expect(manifest.position(ofIndex: layer.index) == i, "index \(layer.index) is not found at its position \(i)")
        }
        guard manifest.version == BackupManifest.currentVersion else {
            expect(manifest.layers.allSatisfy { $0.chunks == nil }, "a version 1 manifest read with chunks")
            return
        }
        do {
            let again = try BackupManifest(validating: try manifest.encoded(), path: path)
            expect(again == manifest, "manifest does not survive encode/decode")
        } catch {
            fatalError("a valid manifest re-encodes to an invalid one: \(error)")
        }
    }
}
