import BackupChain
import Foundation

extension FuzzTargets {
    /// Parses a repository manifest; one that validates survives encode/decode unchanged.
    public static func manifest(_ data: UnsafeRawBufferPointer) {
        let path = "<fuzz>/manifest.json"
        guard let manifest = try? BackupManifest(validating: Data(data), path: path) else { return }
        for i in manifest.layers.indices {
            let start = manifest.segmentStart(of: i)
            expect(start <= i && manifest.layers[start].kind == .full, "segment of layer \(i) starts at \(start)")
        }
        do {
            let again = try BackupManifest(validating: try manifest.encoded(), path: path)
            expect(again == manifest, "manifest does not survive encode/decode")
        } catch {
            fatalError("a valid manifest re-encodes to an invalid one: \(error)")
        }
    }
}
