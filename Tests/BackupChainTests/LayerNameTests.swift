@testable import BackupChain
import Foundation
import Testing

/// Leftover clean-up removes files that look like qbackup's layers but are not in
/// the manifest: the name test must take exactly qbackup's names and nothing else.
@Suite struct LayerNameTests {
    @Test func layerNamesAreRecognisedExactly() {
        for name in ["full-20261125T094800Z.qcow2", "incr-20261125T094800Z.qcow2", "incr-20261125T094800Z-2.qcow2",
                     "full-19991231T235959Z-123.qcow2"] {
            #expect(BackupRepository.isLayerFileName(name), "\(name)")
        }
        for name in ["", "full-.qcow2", "full-20261125T094800Z.qcow", "full-20261125T094800Z.qcow2.partial",
                     "diff-20261125T094800Z.qcow2", "full-20261125T094800.qcow2", "full-2026112aT094800Z.qcow2",
                     "full-20261125T094800Z-.qcow2", "full-20261125T094800Z-x.qcow2", "full-20261125X094800Z.qcow2",
                     "manifest.json", "vm.qcow2", "full-20261125T094800Z--2.qcow2", "xfull-20261125T094800Z.qcow2"] {
            #expect(!BackupRepository.isLayerFileName(name), "\(name)")
        }
        // Every name the repository makes is one.
        let date = Date(timeIntervalSince1970: 1_764_064_080)
        #expect(BackupRepository.isLayerFileName("incr-\(BackupRepository.compactStamp(date)).qcow2"))
    }
}
